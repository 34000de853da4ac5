"""fastpath: exact target-token log-probabilities from vLLM, without Python objects per position."""

__version__ = "0.1.0"
