"""wildreid: out-of-core unsupervised vehicle re-identification (SSML-FD).

The Python API (``wildreid.api``, docs/api.md): one function per command, keyword arguments named like its
options, returning what its ``--json`` line carries.
"""

__version__ = "0.1.0"

from wildreid.api import embed, evaluate, export, inspect, mine, search, shard, synth, train, visualize

__all__ = ["embed", "evaluate", "export", "inspect", "mine", "search", "shard", "synth", "train", "visualize"]
