"""wildreid's Python API: the functions every ``wildreid`` command calls, importable as ``wildreid.<name>``.

Keyword arguments are named like the command's options (``--memory-budget`` is ``memory_budget``, which takes
bytes or a size such as ``"2GiB"``); each function returns what the command's ``--json`` line carries and
raises the :class:`~wildreid.core.errors.WildreidError` subclasses that the command turns into its exit codes
(``wildreid.core.errors``). Long stages take three optional callbacks: ``progress(phase, advance, total)``,
``log(message)`` and ``should_stop()`` (polled between blocks; a stage asked to stop raises
:class:`~wildreid.core.errors.Stopped` after its finished work, and the same call resumes it).

docs/api.md shows a sweep over seeds.

The functions live in modules by what they load: ``data`` (synth, shard: no torch), ``store`` (mine: torch
without the model code), ``launching`` (train's overrides and its ranks' launch: torch without the model code)
and ``model`` (everything that reads images into tensors or runs the network).
``wildreid.api.<name>`` loads only the module of ``name``, so ``wildreid shard`` and ``wildreid synth`` start
without torch (about 6 s less per command on 2 cores).
"""

from __future__ import annotations

import importlib

__all__ = [
    "EVAL_SPLITS",
    "embed",
    "evaluate",
    "export",
    "inspect",
    "launch_ranks",
    "mine",
    "search",
    "shard",
    "synth",
    "train",
    "train_overrides",
    "visualize",
]

_LIGHT = {
    "synth": "data",
    "shard": "data",
    "mine": "store",
    "launch_ranks": "launching",
    "train_overrides": "launching",
}
_HOMES = {**{name: "model" for name in __all__}, **_LIGHT}


def __getattr__(name: str):
    # Loaded on first use (as wildreid/__init__.py does): importing a command's module loads its libraries.
    if name not in _HOMES:
        raise AttributeError(f"module 'wildreid.api' has no attribute {name!r}")
    return getattr(importlib.import_module(f"wildreid.api.{_HOMES[name]}"), name)
