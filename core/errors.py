"""Every error wildreid raises on purpose.

Each class also inherits the builtin it refines, so callers that only know the
builtins still catch it. Messages say what was expected, what was found and
what to do; the CLI prints them as one line and exits with ``exit_code``.
"""

from __future__ import annotations


class WildreidError(Exception):
    """Base of all deliberate wildreid errors."""

    exit_code = 2


class LayoutError(WildreidError, ValueError):
    """A dataset folder does not match the layout that was asked for."""

    exit_code = 3


class BadImageError(WildreidError, ValueError):
    """An image is missing, empty, truncated or cannot be decoded."""

    exit_code = 4


class ShardError(WildreidError, ValueError):
    """A shard set is incomplete, corrupted or does not match its manifest."""

    exit_code = 5


class ShardNotFoundError(ShardError, FileNotFoundError):
    """A shard folder, manifest or split is missing."""


class ConfigError(WildreidError, ValueError):
    """A command-line option or config value is out of range."""

    exit_code = 2


class BudgetError(ConfigError):
    """A memory budget too small for a working set; ``need`` is the smallest working set, in bytes."""

    def __init__(self, message: str, need: int):
        super().__init__(message)
        self.need = need


class StoreError(WildreidError, ValueError):
    """A Zarr store is missing arrays, has the wrong shape, or belongs to another run."""

    exit_code = 6


class ResumeError(WildreidError, ValueError):
    """Resume state does not match the job being resumed."""

    exit_code = 7


class DamagedDataError(StoreError):
    """A chunk of a Zarr array or a checkpoint file fails its checksum, or is truncated."""


class LockedError(WildreidError, BlockingIOError):
    """Another live process is writing the same store or shard folder."""

    exit_code = 8


class ExportError(WildreidError, ValueError):
    """An exported model does not run back, or disagrees with PyTorch; nothing was written."""

    exit_code = 9


class Stopped(WildreidError):
    """SIGTERM or SIGINT asked the command to stop; it stopped where a re-run resumes."""

    exit_code = 75  # EX_TEMPFAIL (sysexits.h): "try again later", what a scheduler should requeue on


class DistributedError(WildreidError, RuntimeError):
    """A rank of a distributed run failed, or a collective with the other ranks did not complete in time."""

    exit_code = 10
