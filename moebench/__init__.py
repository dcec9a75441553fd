"""moebench: one harness for LoRA mixture-of-experts methods.

`import moebench` stays light (no torch, no streamlit); the pieces live in submodules.
"""

__version__ = "0.1.0"
