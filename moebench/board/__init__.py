"""The leaderboard's numbers: main table rows over seeds, paired verdicts, tie ranks, exports.

Library code only (no streamlit): `moebench leaderboard --export`, the Streamlit app in `app/`
and the tests all call these functions, so the page and the terminal cannot disagree.
"""
