"""wildreid: out-of-core unsupervised vehicle re-identification (SSML-FD).

The Python API (``wildreid.api``, docs/api.md): one function per command, keyword arguments named like its
options, returning what its ``--json`` line carries: ``wildreid.train(...)``, ``wildreid.evaluate(...)``.
"""

__version__ = "0.1.0"

__all__ = ["embed", "evaluate", "export", "inspect", "mine", "search", "shard", "synth", "train", "visualize"]


def __getattr__(name: str):
    # Loaded on first use, not on import: every wildreid.* import runs this file, and a dask worker that
    # mines a store or a process that reads shards must not load the model code (torch, torchvision) for it.
    if name in __all__:
        from wildreid import api

        return getattr(api, name)
    raise AttributeError(f"module 'wildreid' has no attribute {name!r}")
