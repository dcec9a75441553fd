"""The LLM-Adapters repository as a download source: its address and the sha256 of its files.

A worker without a data folder fetches what a suite needs from the upstream repository (or a
mirror of its layout named by `$MOEBENCH_LLM_ADAPTERS_URL`, e.g. an HTTP server inside a
cluster) into its cache, through `moebench.fetch.download`, which keeps a file only when its
sha256 is the one recorded here. The hashes were taken from the files of LLM-Adapters commit
816657208af4 (AGI-Edgerunners/LLM-Adapters, the copy in the project's shared data folder). The
large training mixes (commonsense_170k.json, math_10k.json) were not at hand, so they have no
recorded hash: they are downloaded unverified, with a warning, and their sha256 is still stored
with every run in the data fingerprint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from moebench.fetch import download

log = logging.getLogger(__name__)

UPSTREAM = "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/"
MIRROR_ENV = "MOEBENCH_LLM_ADAPTERS_URL"

# `sha256sum` lines of LLM-Adapters commit 816657208af4, path relative to the repository root
_SUMS = """\
de677f5f0139340009eb01f17c0db781b4161912cd1f4efa77292f2fcf3478ee  dataset/AQuA/test.json
4a89ce368ae01a71d268d9851686738b2a0a1d84271116bab49a1dd2b48ecad7  dataset/ARC-Challenge/test.json
3f32a84716ca6d57d38728bf80cc8117aecd17445c2cf29a68b571b810eb82dc  dataset/ARC-Easy/test.json
62a8662b1ad40879953c4df0e61883a749d03aa3fc5e71f1cdb842b816e139ff  dataset/AddSub/test.json
a40f426807c8a563802c2a5b66bda3bcd1eba9c099038fd1199f0dd57de5fd28  dataset/MultiArith/test.json
ffed015784f738f317c5603177861d044c4fc94e09211d78b25e96d46c656e2c  dataset/SVAMP/test.json
712b15edb851c97aab42a5de106d94008f94d917366c92537ed5400a8aacb207  dataset/SingleEq/test.json
89df2397cbca81dc31adcc6f7f5b635821aa0565aafde46725b2b4bd39b4dfa9  dataset/boolq/test.json
2cc616a1e0b23ea1df29370476365cde71c4e0aa823fb06cc194c5a8a9381abe  dataset/gsm8k/test.json
c1a708979cbf2b3df9ac4020baacf3e8e73fcf089e1de7dd1b305b810bfaa15f  dataset/mawps/test.json
8479930f7b8a26052c78250280b5465a4016ca7fc806af440d0f37e243f3099e  dataset/openbookqa/test.json
3860d11b9b42e590b6b4bbc1643214d373ed0b0d4ac62fcc7bdceb8e044ad141  dataset/piqa/test.json
71543f41127451945379d106ffedaef502f1c8770dff6d2f543aca85e3080b1d  dataset/social_i_qa/test.json
6946f5209e7114c65c6d04f8f644c5a061af20d730b1cfe158fff3dc44076fb9  dataset/winogrande/test.json
a9debff28aafed86a08211dc3584a3b6cb38edca8c56bb34cd5002ed54aeebfb  dataset/ARC-Challenge/train.json
6a06cece3dec32f4fb1c1b0fc29dab14be7cf3053b417290dbc6cd845359f5ff  dataset/ARC-Easy/train.json
5ccbaceebaddc69765e1c4a363632196b81851d303696672165ab59ec4e48c83  dataset/boolq/train.json
a1e094eeea01f70c0baa880f37497b26700ae99b243927b9c529984de9b1fe90  dataset/openbookqa/train.json
"""
SHA256 = {path: digest for digest, path in (line.split() for line in _SUMS.splitlines())}
"""Upstream path -> sha256 of the file at LLM-Adapters commit 816657208af4."""


def base_url() -> str:
    """Where LLM-Adapters files are fetched from: the mirror if one is named, else GitHub."""
    base = os.environ.get(MIRROR_ENV) or UPSTREAM
    return base if base.endswith("/") else base + "/"


def fetch(upstream_path: str, dest: Path) -> Path:
    """Download one upstream file into `dest`, verified against its recorded sha256."""
    url = base_url() + upstream_path
    expected = SHA256.get(upstream_path)
    if expected is None:
        log.warning("%s has no recorded sha256; it is kept unverified", upstream_path)
    log.info("downloading %s", url)
    return download(url, dest, expected)
