"""``wildreid train --nproc-per-node N``: the same run as ``torchrun --standalone --nproc-per-node N -m wildreid``.

It starts torch's elastic agent in this process (``torch.distributed.launcher``,
what torchrun runs), which starts N ranks of ``python -m wildreid`` with the
rendezvous environment and stops the whole group when one of them fails. Every
rank prints its own one-line error; this says which rank ended the run, in one
line, and exits with that rank's code (a rank killed by a signal: 128 + it).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import Callable, Sequence

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from wildreid.core.errors import DistributedError, Stopped

__all__ = ["launch", "without_option"]


def without_option(argv: Sequence[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE`` (the ranks must not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def launch(nproc: int, argv: Sequence[str], say: Callable[[str], None]) -> int:
    """Run ``python -m wildreid ARGV`` as ``nproc`` ranks on this machine; returns the exit code for the user."""
    # torch's agent logs each worker's start and a multi-line report of a failure; the ranks say it in one line
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # as torchrun: the ranks share the cores instead of each taking all of them
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # every rank is on this machine: gloo talks over loopback, not over the interface the host name resolves to
    # (which a container may not resolve at all)
    if "lo" in (name for _, name in socket.if_nameindex()):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # torchrun --standalone: a free port on this machine
        max_restarts=0,  # a failed run is resumed by the user (--resume), not restarted from its start
        monitor_interval=0.1,
        start_method="spawn",
        # on SIGTERM the ranks get it too and checkpoint before they exit: give them longer than torch's 30 s
        shutdown_timeout=int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "120")),
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "wildreid", *argv)
    except ChildFailedError as exc:
        rank, failure = _cause(exc.failures)
        code = failure.exitcode
        if code < 0:
            say(f"rank {rank} was killed by {signal.Signals(-code).name}; the other ranks were stopped")
            return 128 - code
        if code != Stopped.exit_code:  # a stop the ranks agreed on: rank 0 has said where
            say(f"rank {rank} exited with code {code}; the other ranks were stopped")
        return code
    except SignalException as exc:  # SIGTERM/SIGINT to the launcher: the ranks got it too and stopped
        say(f"stopped by {signal.Signals(exc.sigval).name}; resume with --resume")
        return 75
    return 0


def _cause(failures: dict) -> tuple[int, object]:
    """The failure that ended the run: a rank's own error or death before the ranks that only saw a peer go
    (exit code 10, or the agent's SIGTERM), then the earliest, then the lowest rank. torch's own
    ``get_first_failure`` orders by whole-second timestamps only, so a consequence seen in the same
    second as its cause could be reported instead of it."""
    consequences = (DistributedError.exit_code, -signal.SIGTERM, 128 + signal.SIGTERM)

    def order(item):
        rank, failure = item
        return (failure.exitcode in consequences, failure.timestamp, rank)

    return min(failures.items(), key=order)
