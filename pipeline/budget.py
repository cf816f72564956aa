"""Memory budgets: the default, and how block sizes follow from a budget."""

from __future__ import annotations

import os

__all__ = ["available_memory", "default_budget", "peak_rss_bytes"]


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (cgroup limits included when visible), else 4 GiB."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
            if text.isdigit() and int(text) < 1 << 60:
                limits.append(int(text))
        except OSError:
            continue
    return min(limits) if limits else 4 << 30


def default_budget() -> int:
    """A quarter of the memory available now: room for the model, the OS cache and other users."""
    return max(64 << 20, available_memory() // 4)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if os.name == "posix" else 0
