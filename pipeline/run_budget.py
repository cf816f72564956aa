"""One memory budget for a training run's whole process tree: the training process and its DataLoader workers.

What ``--memory-budget`` covers is the tree's summed USS (psutil's ``memory_full_info``:
the pages unique to each process, so what forked workers share with the parent is
counted once). It is split, in this order:

1. the training process as the plan finds it (interpreter, torch and the other
   libraries, the model, the optimizer), measured then: ``import torch`` alone is
   ~490 MiB of USS on this machine, wildreid's imports ~200 MiB more;
2. what the first step adds: gradients and momentum buffers (two copies of the
   weights), the activations one batch saves for the backward pass (counted with
   torch's saved-tensor hooks on a two-image batch, scaled to the batch; on CUDA
   they live on the device and only the input batch is counted) and ``STEP_SLACK``;
3. each DataLoader worker: ``WORKER_BYTES`` and ``prefetch_factor`` + 1 batches;
4. the rest, for the data structures: the dictionary page cache (1/2), gathered
   hard-negative rows (1/8), the graph page cache with graph negatives (1/8), and
   mining (1/2, which runs between epochs while no cache is open).

A budget that cannot hold parts 1-3 and the smallest rest the data structures work
with is refused with the smallest budget that works.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import psutil
import torch

from wildreid.budget import release_free_memory
from wildreid.core.errors import BudgetError, ConfigError

__all__ = [
    "STEP_SLACK",
    "WORKER_BYTES",
    "Measured",
    "RunMemory",
    "activation_bytes",
    "plan_run_memory",
    "process_uss",
    "run_measured",
    "run_within",
    "tree_memory",
]

# Measured on resnet18 at 64 x 32, batch 16: a first step grew the process by 120 MiB, 90 of them gradients and
# momentum; the rest is kernel code paged in and allocator caches. 64 MiB of slack once let a run at the smallest
# budget peak 1 MiB over it (739 of 738 MiB, SMALL settings with two workers), hence 80.
STEP_SLACK = 80 << 20
# Measured: a forked DataLoader worker peaked at 15 MiB of USS (batches of 16 images of 64 x 32); its batches are
# counted apart, so this is what a worker touches whatever the batch (interpreter objects, decoder state), with margin.
WORKER_BYTES = 32 << 20
PREFETCH_FACTOR = 2  # torch's default: batches a worker prepares ahead


def process_uss(pid: int | None = None) -> int:
    """USS of one process (this one by default), in bytes."""
    return psutil.Process(pid).memory_full_info().uss


T = TypeVar("T")


def run_within(budget: int, run: Callable[[int], T], *, what: str) -> T:
    """``run(left)`` with what a whole-process ``budget`` leaves once what this process holds now
    (interpreter, libraries, a loaded model; malloc's free arenas handed back first) is taken out of it.

    What it holds is counted as its RSS, not its USS: library pages that another process (a second
    torch program) maps too are left out of USS while that process runs and come back into it when it
    exits, 225 MiB of torch's in one measurement, so a budget planned on USS could be overrun by them.

    ``run`` plans its working set within ``left`` and raises :class:`BudgetError` with the working set it
    needs when that is too little; the error then names the smallest whole-process budget that works.
    """
    release_free_memory()
    held = psutil.Process().memory_info().rss
    try:
        return run(max(1, budget - held))
    except BudgetError as exc:
        raise ConfigError(
            f"--memory-budget {budget / 2**20:,.0f} MiB covers this whole process, which holds "
            f"{held / 2**20:,.0f} MiB before {what} (interpreter, libraries, model) while {what} needs "
            f"{exc.need / 2**20:,.0f} MiB more: the smallest budget that works is "
            f"{-(-(held + exc.need) // 2**20):,} MiB"
        ) from None


def tree_memory(pid: int) -> tuple[int, int]:
    """(USS, PSS) summed over process ``pid`` and all its descendants, in bytes (0 for vanished ones)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    uss = pss = 0
    for p in procs:
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        uss, pss = uss + info.uss, pss + getattr(info, "pss", info.uss)
    return uss, pss


@dataclass(frozen=True)
class Measured:
    """A finished command, its wall time and its process tree's peaks sampled from outside."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_uss: int  # the largest summed USS seen (tree_memory)
    peak_pss: int
    most_children: int  # the most descendants alive at one sample (e.g. DataLoader workers)


def run_measured(cmd: Sequence[str], *, interval: float = 0.5, env: dict | None = None) -> Measured:
    """Run ``cmd`` to its end, sampling its whole process tree's USS and PSS every ``interval`` seconds
    (the tests, benchmarks and the full-size rehearsal: memory claims measured from outside the process)."""
    began = time.perf_counter()
    peaks = {"uss": 0, "pss": 0, "children": 0}
    done = threading.Event()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:

        def sample() -> None:
            while not done.is_set():
                uss, pss = tree_memory(proc.pid)
                try:
                    children = len(psutil.Process(proc.pid).children(recursive=True))
                except psutil.NoSuchProcess:
                    children = 0
                peaks["uss"], peaks["pss"] = max(peaks["uss"], uss), max(peaks["pss"], pss)
                peaks["children"] = max(peaks["children"], children)
                done.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            out, err = proc.communicate()
        finally:
            done.set()
            sampler.join()
    return Measured(
        proc.returncode, out, err, time.perf_counter() - began, peaks["uss"], peaks["pss"], peaks["children"]
    )


def activation_bytes(model: torch.nn.Module, image_size: tuple[int, int], device) -> tuple[int, int]:
    """Per image: (bytes the forward pass saves for backward, bytes of its largest saved tensor).

    Counted on a two-image batch. The model's buffers (BatchNorm statistics) and
    torch's RNG are restored, so the run is the same as without this count.
    """
    device = torch.device(device)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    rng = torch.get_rng_state()
    seen: dict[tuple, int] = {}
    weights = {(p.untyped_storage().data_ptr(), p.device.type) for p in model.parameters()}

    def pack(tensor: torch.Tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.device.type)
        if key not in weights:  # the weights a layer saves are counted with the model
            seen[key] = tensor.untyped_storage().nbytes()
        return tensor

    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model(torch.zeros(2, 3, *image_size, device=device))
        del out
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        torch.set_rng_state(rng)
        model.zero_grad(set_to_none=True)
    return sum(seen.values()) // 2, max(seen.values(), default=0) // 2


@dataclass(frozen=True)
class RunMemory:
    budget: int
    process: int  # the training process when planned
    step: int  # what the first step adds: gradients, momentum, activations, slack
    workers: int  # the DataLoader workers
    cache: int  # dictionary page cache (host pages)
    gathers: int  # gathered hard-negative rows
    graph: int  # the k-NN graph's page cache (graph negatives), else 0
    mining: int  # mining, between epochs

    @property
    def rest(self) -> int:
        return self.budget - self.process - self.step - self.workers


def plan_run_memory(
    budget: int,
    *,
    process: int,
    weights: int,
    saved: int,
    largest: int,
    batch: int,
    extract_batch: int,
    image_bytes: int,
    extract_rows_bytes: int,
    workers: int,
    least_rest: int,
    use_graph: bool,
) -> RunMemory:
    """Split ``budget`` (module docstring); ``least_rest``: the smallest rest the data structures work with.

    ``saved`` / ``largest``: per image, what a training forward saves and its largest tensor
    (``activation_bytes``; 0 where activations live on a device); ``image_bytes``: one input
    image as float32; ``extract_rows_bytes``: the features an extraction holds before a
    whole chunk is written. A step is the larger of a training step and an extraction
    batch (no gradient: about two of the largest activations at once).
    """
    training = 2 * weights + saved * batch + 3 * image_bytes * batch
    extraction = 2 * largest * extract_batch + 2 * image_bytes * extract_batch + extract_rows_bytes
    step = max(training, extraction) + STEP_SLACK
    batch_bytes = image_bytes * batch
    loader = workers * (WORKER_BYTES + (PREFETCH_FACTOR + 1) * batch_bytes)
    rest = budget - process - step - loader
    if rest < least_rest:
        smallest = process + step + loader + least_rest
        raise ConfigError(
            f"memory budget of {budget / 2**20:,.0f} MiB cannot hold this run's process tree: the training "
            f"process takes {process / 2**20:,.0f} MiB (interpreter, torch, model), a step "
            f"{step / 2**20:,.0f} MiB, {workers} DataLoader worker(s) {loader / 2**20:,.0f} MiB, and the "
            f"dictionary's caches and mining at least {least_rest / 2**20:,.0f} MiB; the smallest budget that "
            f"works is {-(-smallest >> 20):,} MiB"
        )
    return RunMemory(
        budget=budget,
        process=process,
        step=step,
        workers=loader,
        cache=rest // 2 - (rest // 8 if use_graph else 0),
        gathers=rest // 8,
        graph=rest // 8 if use_graph else 0,
        mining=rest // 2,
    )
