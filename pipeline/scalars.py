"""TensorBoard scalars of a training run (an optional extra: ``pip install 'wildreid[tensorboard]'``).

Per step: the loss and the learning rate of each parameter group; per finished epoch: every number of the
epoch's history record. Everything is indexed by the global step, so a resumed run (``--resume`` after a
kill -9 or a SIGTERM) opens its writer with ``purge_step`` just after the checkpoint's step and TensorBoard
drops what the lost part of the earlier session wrote from there on: the curves show one run, not two.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from wildreid.core.errors import ConfigError

__all__ = ["NoScalars", "TensorBoardScalars", "open_scalars", "read_scalars", "require_tensorboard"]


class NoScalars:
    """What a run without ``--tensorboard`` writes: nothing."""

    def step(self, step: int, loss: float, lrs: Mapping[str, float]) -> None:
        pass

    def epoch(self, step: int, record: Mapping) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def require_tensorboard() -> None:
    """ConfigError naming what to install when the tensorboard package is missing (checked before a run
    writes anything)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--tensorboard needs the tensorboard package, which is not installed; "
            "run pip install 'wildreid[tensorboard]' or leave --tensorboard out"
        ) from None


class TensorBoardScalars(NoScalars):
    def __init__(self, log_dir: Path, purge_step: int | None):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the TensorBoard folder {log_dir} ({exc.strerror}); name another"
            ) from None
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def step(self, step: int, loss: float, lrs: Mapping[str, float]) -> None:
        self.writer.add_scalar("step/loss", loss, step)
        for group, lr in lrs.items():
            self.writer.add_scalar(f"step/lr/{group}", lr, step)

    def epoch(self, step: int, record: Mapping) -> None:
        for key, value in _numbers(record):
            self.writer.add_scalar(f"epoch/{key}", value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _numbers(record: Mapping, prefix: str = ""):
    """(key, value) of every finite number in ``record``, nested mappings flattened as ``outer/inner``."""
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _numbers(value, f"{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield name, float(value)


def open_scalars(log_dir: str | Path | None, *, resumed_step: int | None = None) -> NoScalars:
    """A TensorBoard writer into ``log_dir``, or one that writes nothing when ``log_dir`` is None.

    ``resumed_step``: the step of the checkpoint a resumed run starts from. Steps are logged after they
    are taken (1, 2, ...), so the resumed run logs ``resumed_step + 1`` next, and everything the earlier
    session logged from there on is purged.
    """
    if log_dir is None:
        return NoScalars()
    return TensorBoardScalars(Path(log_dir), None if resumed_step is None else resumed_step + 1)


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under ``log_dir`` as TensorBoard shows it (purged steps dropped): tag -> [(step, value)]."""
    require_tensorboard()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
