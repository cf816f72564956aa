"""wildreid: out-of-core unsupervised vehicle re-identification (SSML-FD)."""

__version__ = "0.1.0"
