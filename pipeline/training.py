"""SSML-FD training: the epoch loop around the dictionary, DPLM and DTL.

Everything a run writes lives in the store folder:

    STORE/features, ids, camids       the dictionary (one row per training image)
    STORE/knn, positives              the latest DPLM mining (``wildreid mine``; train.mining=epoch)
    STORE/train/checkpoints/ckpt-*    crash-safe checkpoints (see wildreid.checkpoint)
    STORE/train/history.jsonl         one line per finished epoch
    STORE/train/curves.png            the training curves
    STORE/train/model.pt              the final model (what ``wildreid eval`` reads)

Memory: ``--memory-budget`` covers the whole process tree (``wildreid.run_budget``):
the training process, a step and the DataLoader workers come first; of what is
left, the dictionary's page cache gets half and mining the other half while it
runs (the cache is flushed and dropped first). Hard negatives stream the dictionary
through the cache in pages, so nothing here holds N x N or N x D beyond it.
With ``loss.negatives: graph`` they are picked among each row's k-NN graph
neighbours instead (``wildreid.dtl.graph_negatives``): the graph is mined at the
start of every epoch, warm-up included (there only its k-NN stage), and read
through a page cache of 1/8 of what is left over ``knn/indices``.

Dictionary refresh (``train.refresh``). "published" (default) does what the
published code does (andreYoo/VeRI_SSML_FD, lib/models/graph.py and
lib/trainer.py): the dictionary starts at zeros, each training step's momentum
update fills the rows of its batch (from a zero row the update is the feature
itself), and at every epoch with ``epoch % reextract_every == 0 and epoch != 0``
it is rebuilt before the epoch's steps by a pass over the training loader under
``torch.no_grad()`` with the model in train mode, on the training augmentation:
BatchNorm normalises with each batch's statistics and moves its running
statistics as much as a training epoch's forward passes do, and the rows are
overwritten, not blended. The pass reads the epoch's data in its own order and
augmentation (``refresh_key``); a one-sample batch, which train-mode BatchNorm
cannot normalise, is taken in eval mode. The pass checkpoints like training
steps do (``ckpt-<step>-refresh-<samples>``), so a kill -9 or a stop inside it
resumes exactly. "eval" re-extracts the dictionary in eval mode without
augmentation at epoch 0 and every ``reextract_every`` epochs
(``wildreid.extract``), leaving BatchNorm's statistics alone. In "published"
runs a one-sample training batch updates its row from an eval-mode feature
(no step), so that no row is still zero when mining starts.

Mining schedule (``train.mining``): "epoch" (default) mines DPLM once per epoch
from the exact k-NN graph (``wildreid.mining``). "batch" is the published
behaviour: after warm-up, each step's positives are ``dplm_rows`` of the batch
rows against the live dictionary (the cache's rows, momentum updates of earlier
steps included), with no k-NN graph. It holds the dictionary and full similarity
rows in memory, so it is refused unless ``dplm_rows_bytes`` fits a quarter of the
budget; its history records the quality of the positives the steps really used.

Several processes (``wildreid.world``; ``--nproc-per-node`` or torchrun): the same phases run on
every rank, each over its share of every global batch and the dictionary rows it owns
(``wildreid.sharded``); rank 0 alone writes the store's attributes, the history and the model, and
every decision that ends a loop (a stop, a batch too small to train on) is taken from counts all
ranks agree on, so the ranks always call the same collectives in the same order.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from wildreid.budget import default_budget, peak_rss_bytes
from wildreid.camera import mined_means, normalised_dictionary, unknown_cameras
from wildreid.checkpoint import (
    begin_checkpoint,
    checkpoint_paths,
    finish_checkpoint,
    load_positives,
    load_rng,
    load_state,
    resume_checkpoint,
    save_checkpoint,
    save_model,
    save_part,
)
from wildreid.config import Config, config_digest
from wildreid.core.errors import ConfigError, DistributedError, ResumeError, ShardNotFoundError, Stopped, StoreError
from wildreid.core.signals import fault_point, ignore_stop_signals
from wildreid.dplm import (
    dplm_rows,
    dplm_rows_bytes,
    oracle_positives,
    pseudo_label_quality,
    quality_means,
    quality_sums,
)
from wildreid.dtl import Cameras, batch_positives, dtl_loss, dtl_streaming, graph_negatives, momentum_update
from wildreid.extract import EXTRACT_BATCH, extract_split, refresh_key
from wildreid.label_free import positives_stats
from wildreid.mining import GRAPH_CHUNK_ROWS, MineParams, mine, smallest_budget
from wildreid.model import ARCHS, build_model, param_groups, weights_sha256
from wildreid.plots import training_curves
from wildreid.run_budget import RunMemory, activation_bytes, plan_run_memory, process_uss
from wildreid.scalars import NoScalars, open_scalars, require_tensorboard
from wildreid.sharded import ddp_model, owned, sharded_step, update_owned
from wildreid.shards.reader import ShardDataset, decode_batch, split_entries, split_entry, split_labels
from wildreid.stores import CHUNK_BYTES, LOCK_NAME, FeatureStore, PageCache, WriterLock, atomic_write, rows_per_chunk
from wildreid.stores.derived import complete_fingerprint, graph_reader, read_positives
from wildreid.transforms import train_transform
from wildreid.world import World, check_world_size, sync_batchnorm

__all__ = ["TrainOptions", "dictionary_sha256", "dictionary_step", "refresh_features", "train"]

SPLIT = "train"
TRANSDUCTIVE_SPLIT = "gallery"  # VeRi-776's image_test: what the published VeRi-776 run also trained on
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TrainOptions:
    resume: bool = False
    memory_budget: int | None = None
    device: str = "cpu"
    deterministic: bool = False
    device_budget: int | None = None  # the page cache's device tier; None: DEVICE_SHARE of free CUDA memory, 0 on CPU
    max_steps: int | None = None  # stop (checkpointed, resumable) after this many steps of this invocation
    tensorboard: str | None = None  # a folder for TensorBoard scalars (wildreid.scalars); None: none written


# Without --device-budget, a CUDA run gives the dictionary's device pages this share of the device memory that is
# free when training starts; the rest stays for the model, its activations and the hard-negative scan.
DEVICE_SHARE = 0.5


def device_budget(options: TrainOptions, device: torch.device) -> int:
    """Bytes of dictionary pages kept on ``device`` (``TrainOptions.device_budget``, or the CUDA default)."""
    if options.device_budget is not None:
        return options.device_budget
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * DEVICE_SHARE)


def dictionary_sha256(store: FeatureStore, block_rows: int = 65536) -> str:
    """Digest of the dictionary's stored bytes, row order, plus its dtype and shape."""
    digest = hashlib.sha256(f"{store.features.dtype}{store.features.shape}".encode())
    for start in range(0, store.count(), block_rows):
        digest.update(np.ascontiguousarray(store.features[start : start + block_rows]).tobytes())
    return digest.hexdigest()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    """The RNG states as tensors and plain values (what ``torch.load(weights_only=True)`` reads back)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {"key": numpy_state["state"]["key"].tolist(), "pos": int(numpy_state["state"]["pos"])}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {
        "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
        "pos": numpy_state["state"]["pos"],
    }
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _set_lr(optimizer: torch.optim.Optimizer, config: Config, epoch: int) -> LambdaLR:
    """Every group's learning rate in ``epoch`` by torch's LambdaLR: lr * lr_factor * decay_at(epoch).

    Made at the epoch's start from the epoch alone (LambdaLR's closed form), so a resumed run needs no
    scheduler state of its own."""
    for group in optimizer.param_groups:
        group["initial_lr"] = config.train.lr * group["lr_factor"]
    return LambdaLR(optimizer, config.train.decay_at, last_epoch=epoch - 1)


def _check_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return dev


def _open_store(
    path: Path, n: int, dim: int, resume: bool, digest: str, dtype: str, labels, processes: int = 1
) -> FeatureStore:
    """The run's store: created (``labels()`` gives its ids and camids), or reopened for --resume
    after checking it belongs to this run. Created for a run of several ``processes``, its chunks are
    small enough that each process owns at least one (small dictionaries only: the usual chunk is 8 MiB)."""
    if path.exists() and any(p.name != LOCK_NAME for p in path.iterdir()):
        store = FeatureStore.open(path, mode="r+")
        run = store.meta("train_run")
        if run is None:
            raise StoreError(f"{path} holds a store that no training run wrote; choose a new --store path")
        if run["config"] != digest or store.count() != n or store.dim() != dim:
            raise StoreError(
                f"{path} belongs to another training run (other config or data set); "
                "choose a new --store path, or the same config to resume"
            )
        if not resume:
            raise ResumeError(
                f"{path} already holds a training run; pass --resume to continue it or choose a new --store path"
            )
        return store
    row_bytes = dim * np.dtype(dtype).itemsize
    chunk_bytes = min(CHUNK_BYTES, -(-n // processes) * row_bytes)
    store = FeatureStore.create(path, n, dim, dtype=dtype, chunk_bytes=chunk_bytes)  # zeros until filled
    store.write_labels(0, *labels())  # what mining quality is scored against before any extraction
    store.set_meta("train_run", {"config": digest})
    return store


def _train_splits(shards, transductive: bool) -> str | tuple[str, str]:
    """The split(s) a run trains on: ``train``, or ``train`` then the test gallery when transductive."""
    if not transductive:
        return SPLIT
    try:
        split_entry(shards, TRANSDUCTIVE_SPLIT)
    except ShardNotFoundError as exc:
        raise ConfigError(
            f"--transductive trains on the '{TRANSDUCTIVE_SPLIT}' split as well (VeRi-776 layout), "
            f"but {exc}; drop --transductive for these shards"
        ) from None
    return (SPLIT, TRANSDUCTIVE_SPLIT)


def _self_positives(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64)


def _mine(
    store: FeatureStore,
    config: Config,
    budget: int,
    workers: int,
    progress: Progress,
    should_stop,
    graph_only=False,
    world: World = World(),
    camera_penalty: float = 0.0,
):
    """DPLM on the current dictionary: ``(positives CSR, report)``; ``graph_only``: the k-NN graph, ``(None, report)``.

    Every write to the features bumped their version, so a graph of older features is not reused.
    ``camera_penalty``: the camera-aware candidate lists' delta (0: off).
    """
    m = config.mining
    params = MineParams(
        k=m.k,
        threshold=m.threshold,
        min_candidates=m.min_candidates,
        adjacency=m.adjacency,
        order=m.order,
        camera_penalty=camera_penalty,
    )
    report = mine(
        str(store.path),  # the dictionary, or its camera-normalised copy (wildreid.camera)
        params,
        memory_budget=budget,
        workers=max(1, workers),
        progress=progress,
        graph_only=graph_only,
        should_stop=should_stop,
        locked=True,
        world=world,
    )
    return (None if graph_only else read_positives(store)), report


def train(
    shards: str | Path,
    store_path: str | Path,
    config: Config,
    options: TrainOptions = TrainOptions(),
    *,
    progress: Progress = lambda phase, advance, total: None,
    log: Callable[[str], None] = lambda message: None,
    should_stop: Callable[[], bool] = lambda: False,
    world: World = World(),
) -> dict:
    """Train (or resume) SSML-FD on the ``train`` split of ``shards``; returns the run's report.

    The store's writer lock is held for the whole run. When ``should_stop()`` turns
    true (``wildreid.core.signals.GracefulStop``), the current step finishes, a checkpoint
    is written and :class:`Stopped` says where; ``--resume`` continues from there.

    ``world``: this process's rank in a run of several (``wildreid.world``; every rank
    calls this). Rank 0 holds the lock for all of them.
    """
    device = world.device if world.distributed else _check_device(options.device)
    lock = WriterLock(store_path, log=log) if world.main else None
    try:
        return _train(shards, Path(store_path), config, options, device, progress, log, should_stop, world)
    except RuntimeError as exc:
        failure = collective_failure(exc) if world.distributed else None
        if failure:
            raise DistributedError(
                f"a collective with the other ranks failed ({failure}): another rank died, or did "
                f"not answer within --collective-timeout {world.timeout_s:g} s; the run stopped: "
                "resume with --resume"
            ) from None
        raise
    finally:
        if lock is not None:
            lock.release()


@dataclass(eq=False)
class _Run:
    """What the phases of one training run share: its inputs, model, store and plans, and where it is."""

    shards: str | Path
    splits: str | tuple[str, str]
    n: int  # the dictionary's rows: the training images
    config: Config
    options: TrainOptions
    device: torch.device
    progress: Progress
    log: Callable[[str], None]
    asked_to_stop: Callable[[], bool]  # the caller's (a signal); should_stop() adds --max-steps
    world: World
    model: torch.nn.Module  # what is saved; ``net`` is what trains (DistributedDataParallel around it, or itself)
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    store: FeatureStore
    run_dir: Path
    memory: RunMemory
    use_graph: bool
    scalars: NoScalars
    augment: Callable
    dataset: ShardDataset
    on_device: int  # bytes of dictionary pages on the device
    gather_rows: int
    # the checkpoint resumed from and its state ({}: none): what a resumed epoch's k-NN graph is checked against
    ckpt: Path | None
    state: dict
    # where the run is: what a checkpoint records
    epoch: int
    position: int
    step: int
    history: list[dict]
    positives: tuple[np.ndarray, np.ndarray]
    partial: dict
    refreshed: int  # samples of this epoch's dictionary rebuild done (0: none, or it is over)
    camera: dict[str, bool]  # the camera-aware pieces this run uses (CameraConfig.pieces; none without camera ids)
    cameras: Cameras | None  # what the camera-aware DTL terms read (None: neither is on)
    steps_here: int = 0  # steps of this invocation: what --max-steps and the crash tests count
    cache_stats: dict[str, int] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)  # this invocation's steps, data loading excluded

    def should_stop(self) -> bool:
        """A signal, or --max-steps reached: the same checkpointed, resumable stop (on every rank at once:
        a collective in a run of several processes, so every rank asks at the same points)."""
        return self.world.any(self.stop_asked_here())

    def stop_asked_here(self) -> bool:
        """``should_stop`` of this process alone (for phases whose ranks agree at their end: mining)."""
        max_steps = self.options.max_steps
        return self.asked_to_stop() or (max_steps is not None and self.steps_here >= max_steps)

    @property
    def share(self) -> int:
        """The most samples of a global batch that one rank takes."""
        return -(-self.config.train.batch_size // self.world.size)

    @property
    def span(self) -> tuple[int, int]:
        """The dictionary rows this rank owns (all of them in a run of one process)."""
        return self.world.owned_rows(self.n, self.store.chunk_rows)

    def stop_here(self) -> None:
        if self.should_stop():
            raise Stopped(f"stopped at epoch {self.epoch} step {self.step}; resume with --resume")


@dataclass(eq=False)
class _Epoch:
    """What one epoch's steps read, and the sums its history record reports (a checkpoint's ``partial``)."""

    per_batch: bool  # train.mining=batch after warm-up: each step mines its own positives
    labels: tuple[np.ndarray, np.ndarray] | None  # what batch mining's quality is scored against
    cache: PageCache
    graph: Callable[[np.ndarray], np.ndarray] | None
    began: float
    losses: list[float]
    seen: int
    mined: dict


def _train(
    shards,
    store_path: Path,
    config: Config,
    options: TrainOptions,
    device: torch.device,
    progress,
    log,
    should_stop,
    world: World,
) -> dict:
    """``train`` with the store's lock held."""
    run = _set_up(shards, store_path, config, options, device, progress, log, should_stop, world)
    while run.epoch < config.train.epochs:
        _epoch(run)
    return _finish(run)


def _set_up(
    shards,
    store_path: Path,
    config: Config,
    options: TrainOptions,
    device: torch.device,
    progress,
    log,
    should_stop,
    world: World,
) -> _Run:
    """Everything before the first epoch: model, optimizer, memory plan, store, resumed checkpoint, data set.

    In a run of several processes rank 0 opens (or creates) the store and restores the checkpoint's
    dictionary first; the other ranks then open it, and every rank loads the checkpoint's state."""
    if options.tensorboard is not None:
        require_tensorboard()
    if options.deterministic:
        torch.use_deterministic_algorithms(True)
    tc = config.train
    splits, n = _training_data(shards, tc, log)
    _check_world(config, world)
    # the shards' labels, read at most once: the oracle and camera checks need them before the store is made
    labels = functools.cache(lambda: split_labels(shards, splits))
    camera = _camera_pieces(labels, config, log if world.main else lambda message: None)
    budget = options.memory_budget or default_budget()
    _seed_everything(tc.seed)
    model, optimizer = _model_and_optimizer(config, device, world)
    use_graph = config.loss.negatives == "graph"
    # planned before the store is touched: a budget that cannot be honoured leaves nothing behind
    memory = _plan_memory(budget, model, n, config, device, use_graph)
    dim = ARCHS[config.model.arch][1]
    run_dir = store_path / "train"
    opened = _store_and_checkpoint(labels, store_path, n, config, options, model, optimizer, world, log)
    store, ckpt, state, (epoch, position, step, history, positives) = opened
    if world.main:
        _write_history(run_dir, history)
    # a resumed run purges what the earlier session logged after its checkpoint: one run's curves, not two
    tensorboard = options.tensorboard if world.main else None
    scalars = open_scalars(tensorboard, resumed_step=step if ckpt is not None else None)
    _log_memory(budget, memory, log)
    if tc.mining == "batch":
        _check_batch_mining(n, dim, tc.batch_size, config.mining.adjacency, memory.rest)
    return _Run(
        shards=shards,
        splits=splits,
        n=n,
        config=config,
        options=options,
        device=device,
        progress=progress,
        log=log,
        asked_to_stop=should_stop,
        world=world,
        model=model,
        net=ddp_model(model, world),
        optimizer=optimizer,
        store=store,
        run_dir=run_dir,
        memory=memory,
        use_graph=use_graph,
        scalars=scalars,
        augment=train_transform(config.model.image_size, seed=tc.seed),
        dataset=_dataset(shards, splits, config, world),
        on_device=device_budget(options, device),
        # gathered hard-negative rows: float32, with their gradient and a float16 copy
        gather_rows=max(256, memory.gathers // (dim * 12)),
        ckpt=ckpt,
        state=state,
        epoch=epoch,
        position=position,
        step=step,
        history=history,
        positives=positives,
        partial=state.get("partial", {}),
        refreshed=state.get("refreshed", 0),  # a rebuild interrupted at this many samples
        camera=camera,
        cameras=_dtl_cameras(store, config, camera, device),
    )


def _camera_pieces(labels, config: Config, log) -> dict[str, bool]:
    """The camera-aware pieces the run uses, and the oracle's check, before anything is written: ConfigError
    for an oracle without every vehicle id; every piece off (said once) where a camera id is unknown."""
    pieces = config.camera.pieces
    if not (config.mining.oracle or any(pieces.values())):
        return pieces
    vids, camids = labels()
    if config.mining.oracle:
        oracle_positives(vids)  # refused here when an id is unknown
    unknown = unknown_cameras(camids)
    if any(pieces.values()) and unknown:
        log(
            f"camera.aware=true, but the camera ids of {unknown:,} of {len(camids):,} training images are "
            "unknown (-1; pass --camera-from to 'wildreid shard' for own data): training camera-agnostic"
        )
        return dict.fromkeys(pieces, False)
    return pieces


def _dtl_cameras(store: FeatureStore, config: Config, camera: dict[str, bool], device) -> Cameras | None:
    if not (camera["own_negatives"] or camera["inter"]):
        return None
    c = config.camera
    return Cameras(
        torch.from_numpy(store.camids()).to(device),
        own_share=c.own_negatives if camera["own_negatives"] else 0.0,
        inter_weight=c.inter_weight if camera["inter"] else 0.0,
    )


def _store_and_checkpoint(
    labels, store_path: Path, n: int, config: Config, options: TrainOptions, model, optimizer, world, log
) -> tuple:
    """The run's store, and model, optimizer and RNGs as the checkpoint resumed from left them: ``(store, checkpoint
    or None, its state or {}, (epoch, position, step, history, positives))``. Rank 0 first (it creates the store,
    sets damaged checkpoints aside and restores the dictionary), then, after a barrier, the other ranks."""
    run_dir = store_path / "train"
    if world.main:
        dim, digest, dtype = ARCHS[config.model.arch][1], config_digest(config), config.dictionary.dtype
        store = _open_store(store_path, n, dim, options.resume, digest, dtype, labels, world.size)
        _check_rows_per_rank(store, n, world)
        _log_start(model, store, n, log)
        found = _restore(run_dir, options.resume, model, optimizer, store, n, log)
    chosen = world.from_main(found[0].name if world.main and found[0] is not None else None)
    if not world.main:  # the checkpoint rank 0 checked and restored, loaded as it is
        store = FeatureStore.open(store_path, mode="r+", meta_writer=False)
        _check_rows_per_rank(store, n, world)
        found = _restore(run_dir, options.resume, model, optimizer, None, n, log, world.rank, chosen)
    return (store, *found)


def _training_data(shards, tc, log) -> tuple[str | tuple[str, str], int]:
    """The split(s) the run trains on and their number of images (at least one batch)."""
    splits = _train_splits(shards, tc.transductive)
    n = sum(entry["num_samples"] for _, entry, _ in split_entries(shards, splits))
    if tc.transductive:
        log(
            f"TRANSDUCTIVE run: training also on the {n - split_entry(shards, SPLIT)['num_samples']} images of the "
            f"'{TRANSDUCTIVE_SPLIT}' split (the test gallery); results are not comparable with inductive ones"
        )
    if n < tc.batch_size:
        raise ConfigError(
            f"the training split(s) have {n} images, fewer than one batch of {tc.batch_size}; lower train.batch_size"
        )
    return splits, n


def _model_and_optimizer(
    config: Config, device: torch.device, world: World
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    tc = config.train
    model = build_model(config.model.arch, pretrained=config.model.pretrained, last_stride=config.model.last_stride)
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if world.distributed and tc.sync_bn:  # the same module with its BatchNorm layers synchronised (same state_dict)
        model = sync_batchnorm(model, device)
    groups = param_groups(model, 1.0, tc.backbone_lr_factor)
    for g in groups:
        g["lr_factor"] = g["lr"]
    # foreach: one fused update over all tensors, bit-identical to the per-tensor loop and ~30 % faster on the CPU
    optimizer = torch.optim.SGD(
        groups, lr=tc.lr, momentum=tc.momentum, nesterov=tc.nesterov, weight_decay=tc.weight_decay, foreach=True
    )
    return model, optimizer


def _log_start(model: torch.nn.Module, store: FeatureStore, n: int, log) -> None:
    """What the run starts from (said once the store is known to be this run's)."""
    if model.pretrained_from is None:
        log("no --pretrained weights given: training starts from random weights")
    unknown = int(np.count_nonzero(store.ids() < 0))
    if unknown:
        log(
            f"the vehicle ids of {unknown:,} of {n:,} training images are unknown (-1): the history shows no "
            "pseudo-label precision or recall, only what needs no ids (positives per image, the share of "
            "images with positives besides themselves, connected groups)"
        )


def _restore(
    run_dir: Path,
    resume: bool,
    model,
    optimizer,
    store: FeatureStore | None,
    n: int,
    log,
    rank: int = 0,
    chosen: str | None = None,
) -> tuple:
    """With --resume, model, optimizer, RNGs and dictionary as the latest checkpoint left them. Returns that
    checkpoint (None: none), its state ({}: none) and where the run is: (epoch, position, step, history, positives).
    ``store`` None: the dictionary is left alone (rank 0 of a distributed run restores it for all), and the
    checkpoint is ``chosen`` (the one rank 0 checked; None: none).
    """
    if store is None:
        found = (
            None if chosen is None else (run_dir / "checkpoints" / chosen, load_state(run_dir / "checkpoints" / chosen))
        )
    else:
        found = resume_checkpoint(run_dir, log) if resume else None
    if found is None:
        return None, {}, (0, 0, 0, [], _self_positives(n))
    ckpt, state = found
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(load_rng(ckpt, rank, state))
    epoch, position, step, history = state["epoch"], state["position"], state["step"], state["history"]
    if store is not None:
        store.replace_features(ckpt / "dictionary")  # a crash-safe swap (FeatureStore.replace_features)
        # an extraction recorded after this checkpoint described rows that were just replaced
        store.set_meta("extraction", {})
    positives = load_positives(ckpt)
    log(f"resumed from {ckpt.name}: epoch {epoch}, sample {position}, step {step}")
    return ckpt, state, (epoch, position, step, history, positives)


def _log_memory(budget: int, memory: RunMemory, log) -> None:
    log(
        f"memory budget {budget / 2**20:,.0f} MiB (whole process tree): training process "
        f"{memory.process / 2**20:,.0f}, step {memory.step / 2**20:,.0f}, DataLoader workers "
        f"{memory.workers / 2**20:,.0f}, dictionary cache {memory.cache / 2**20:,.0f}, mining "
        f"{memory.mining / 2**20:,.0f} MiB"
    )


def _dataset(shards, splits, config: Config, world: World) -> ShardDataset:
    tc = config.train
    return ShardDataset(
        shards,
        splits,
        image_size=tuple(config.model.image_size),
        seed=tc.seed,
        lanes=max(1, tc.workers),
        chunk=tc.batch_size,
        decode=not tc.decode_on_device,
        share=(world.rank, world.size),  # this rank's slice of every global batch
    )


def _page_cache(run: _Run) -> PageCache:
    """This phase's cache over the dictionary: host pages within half the budget, device pages within
    ``run.on_device`` (the whole dictionary there when it fits: it then stays for the phase)."""
    store = run.store
    cache = PageCache(
        store.features,
        host_budget=max(run.memory.cache, _page_bytes(store)),
        device_budget=run.on_device,
        device=run.device,
        dtype=store.features.dtype,
        span=run.span,
    )
    cache.load_all_to_device()
    return cache


def _count(run: _Run, cache: PageCache) -> None:
    for key, value in cache.stats.items():
        run.cache_stats[key] = run.cache_stats.get(key, 0) + value
    # dictionary bytes this process held at once (its own rows only, in a run of several)
    run.cache_stats["held_bytes"] = max(run.cache_stats.get("held_bytes", 0), cache.resident_bytes)


def _checkpoint(run: _Run, cache: PageCache, partial: dict, refreshed: int = 0) -> None:
    """``refreshed``: samples of this epoch's dictionary rebuild done (0: none, or it is over).

    In a run of several processes, in phases between barriers (``wildreid.checkpoint``): every rank writes
    its dirty rows back; rank 0 starts the checkpoint folder; every rank copies the chunks it owns and its
    RNG states, fsynced; then rank 0 writes the state, and LATEST names the checkpoint only when complete."""
    cache.flush()
    tag = f"-refresh-{refreshed:010d}" if refreshed else ""
    world = run.world
    if not world.distributed:
        save_checkpoint(run.run_dir, run.step, _state(run, partial, refreshed), _features(run), run.positives, tag)
        run.scalars.flush()  # what the checkpoint covers is on disk too
        return
    world.barrier()
    if world.main:
        begin_checkpoint(run.run_dir, run.step, _features(run), tag)
    world.barrier()
    tmp, _ = checkpoint_paths(run.run_dir, run.step, tag)
    lo, hi = run.span
    chunk = run.store.chunk_rows
    rng = None if world.main else _rng_state()
    save_part(run.run_dir, tmp, _features(run), (lo // chunk, -(-hi // chunk)), world.rank, rng)
    world.barrier()
    if world.main:
        state = _state(run, partial, refreshed)
        finish_checkpoint(run.run_dir, tmp, run.step, state, run.positives, _features(run), tag, world.size)
        run.scalars.flush()
    world.barrier()


def _features(run: _Run) -> Path:
    return run.store.path / "features"


def _state(run: _Run, partial: dict, refreshed: int) -> dict:
    """What a checkpoint's state.pt holds (rank 0's RNG states; the other ranks' are in their parts)."""
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "rng": _rng_state(),
        "epoch": run.epoch,
        "position": run.position,
        "step": run.step,
        "history": run.history,
        "partial": _plain(partial),
        "graph": complete_fingerprint(run.store, "knn") if run.use_graph else None,
        "refreshed": refreshed,
        "config": run.config.to_dict(),
        # the cameras x D means the last camera-normalised mining removed (None: not normalising)
        "camera_means": _tensors(mined_means(run.store)) if run.camera["normalise"] else None,
    }


def _tensors(values: dict | None) -> dict | None:
    """numpy arrays as tensors, which a weights-only load of state.pt accepts."""
    if values is None:
        return None
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in values.items()}


def _loader(run: _Run, key: int, start: int) -> DataLoader:
    """The training loader over order and augmentation ``key`` (an epoch, or its rebuild's), from ``start``."""
    run.dataset.set_epoch(key, start)
    return DataLoader(
        run.dataset,
        batch_size=None,
        num_workers=run.config.train.workers,
        worker_init_fn=ignore_stop_signals,
        pin_memory=run.device.type == "cuda",
        persistent_workers=False,
    )


def _mine_now(run: _Run, graph_only: bool = False):
    if run.world.distributed and run.world.main:
        # the other ranks' writes do not bump the dictionary's version (rank 0 alone writes its attributes):
        # a new version, so that no graph of older rows is taken for this one
        run.store.bump_features_version()
    store = run.store
    if run.camera["normalise"] and not graph_only:  # DPLM on the camera-normalised dictionary
        store = normalised_dictionary(run.store, run.world)
    return _mine(
        store,
        run.config,
        run.memory.mining,
        run.config.train.workers,
        run.progress,
        # the ranks agree at the end of each mining stage (wildreid.mining), not per block
        run.stop_asked_here if run.world.distributed else run.should_stop,
        graph_only=graph_only,
        world=run.world,
        camera_penalty=run.config.camera.intra_penalty if run.camera["candidates"] and not graph_only else 0.0,
    )


def _epoch(run: _Run) -> None:
    """One epoch (or the rest of a resumed one): its start, its steps, its history record and checkpoint.

    The epoch's caches live as long as this call: at the next epoch's start their memory goes to mining.
    """
    tc = run.config.train
    began = time.perf_counter()
    if run.position == 0:
        _epoch_start(run)
    elif run.use_graph and complete_fingerprint(run.store, "knn") != run.state.get("graph"):
        # resumed mid-epoch from a checkpoint older than the stored graph (a damaged newer one was set aside)
        run.log(
            f"the k-NN graph of epoch {run.epoch} was replaced after {run.ckpt.name}; mining it again from that "
            "checkpoint's dictionary: the run goes on, but is no longer bit-identical to an uninterrupted one"
        )
        _mine_now(run, graph_only=True)
    per_batch = tc.mining == "batch" and not tc.is_warmup(run.epoch)
    ep = _Epoch(
        per_batch=per_batch,
        labels=_labels(run.store.ids()) if per_batch else None,
        cache=_page_cache(run),
        # the graph mined at this epoch's start (kept in the store, so a resumed epoch reads the same one)
        graph=graph_reader(run.store, run.config.mining.k, run.memory.graph) if run.use_graph else None,
        began=began,
        losses=run.partial.get("losses", []),
        seen=run.partial.get("seen", 0),
        mined=run.partial.get("mined", {"rows": 0, "positives": 0, "precision": 0.0, "recall": 0.0, "with_others": 0}),
    )
    _set_lr(run.optimizer, run.config, run.epoch)
    run.model.train()
    _epoch_steps(run, ep, _loader(run, run.epoch, run.position))
    _count(run, ep.cache)
    record = _epoch_record(run, ep)
    run.history.append(_plain(record))
    run.scalars.epoch(run.step, record)
    run.epoch, run.position, run.partial = run.epoch + 1, 0, {}
    _checkpoint(run, ep.cache, run.partial)
    if run.world.main:
        _write_history(run.run_dir, run.history)
    run.log(json.dumps(record))
    if run.epoch < tc.epochs:
        run.stop_here()


def _epoch_start(run: _Run) -> None:
    """Before an epoch's first step: the published dictionary rebuild, then extraction and mining."""
    tc = run.config.train
    run.partial = {}
    run.stop_here()
    if tc.refresh == "published" and run.epoch % tc.reextract_every == 0 and run.epoch != 0:
        _rebuild(run, run.refreshed)  # stops with its own checkpoint
    run.refreshed = 0
    try:
        run.positives = _extract_and_mine(run)
    except Stopped:  # extraction and mining stop after a finished chunk or block: what resume redoes
        raise Stopped(
            f"stopped at epoch {run.epoch} step {run.step}, before the epoch's first step; resume with --resume"
        ) from None


def _extract_and_mine(run: _Run) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode re-extraction and mining before the epoch's first step; returns the epoch's positives."""
    tc = run.config.train
    if tc.refresh == "eval" and run.epoch % tc.reextract_every == 0:
        fault_point(f"extract:{run.epoch}")
        _extract(run)
    fault_point(f"mine:{run.epoch}")
    positives = run.positives
    if tc.is_warmup(run.epoch):
        positives = _self_positives(run.n)
    elif tc.mining == "epoch" and (run.epoch - tc.warmup_epochs) % tc.remine_every == 0:
        if run.config.mining.oracle:  # the ceiling: ground-truth positives through the same DTL
            return oracle_positives(run.store.ids())
        return _mine_now(run)[0]
    if run.use_graph:  # no DPLM this epoch, but graph negatives need a fresh graph
        _mine_now(run, graph_only=True)
    return positives


def _extract(run: _Run, should_stop: bool = True) -> None:
    """The dictionary extracted in eval mode (``wildreid.extract``): by each rank for the rows it owns, then a
    barrier, in a run of several processes (a stop there comes after the whole extraction)."""
    world = run.world
    extract_split(
        run.shards,
        run.splits,
        run.model,
        run.store,
        image_size=tuple(run.config.model.image_size),
        device=run.device,
        progress=run.progress,
        label=f"epoch-{run.epoch}-step-{run.step}",
        should_stop=run.should_stop if should_stop and not world.distributed else lambda: False,
        span=run.span if world.distributed else None,
    )
    world.barrier()
    if world.distributed and should_stop and run.should_stop():
        raise Stopped(f"extraction of epoch {run.epoch} stopped; resume with --resume")


def _rebuild(run: _Run, start: int) -> None:
    """The published refresh (module docstring), from sample ``start`` of its pass."""
    tc, epoch, n = run.config.train, run.epoch, run.n
    run.model.train()
    cache = _page_cache(run)
    key = refresh_key(epoch)
    loader = _loader(run, key, start)
    done, batches = start, 0
    for images, idx, _vid, _cam in loader:
        count = run.world.total(len(idx))
        x = refresh_features(run.model, _inputs(run, images, idx, key), train_mode=_trainable(run, idx, count))
        _set_owned_rows(run, cache, x.float(), idx)
        done += count
        batches += 1
        run.progress(f"refresh {epoch}", count, n)
        fault_point(f"refresh:{epoch}:{batches}")
        stopping = run.should_stop() and done < n
        if done < n and (stopping or tc.checkpoint_every_steps and batches % tc.checkpoint_every_steps == 0):
            _checkpoint(run, cache, {}, refreshed=done)
        if stopping:
            raise Stopped(
                f"stopped at epoch {epoch} step {run.step}, in the dictionary rebuild ({done} of {n} "
                "samples); resume with --resume"
            )
    cache.flush()
    run.world.barrier()  # the rebuilt rows of every rank are in the store before mining reads them
    _count(run, cache)


def _epoch_steps(run: _Run, ep: _Epoch, loader: DataLoader) -> None:
    """The epoch's batches from ``run.position`` on, each a step with its bookkeeping: checkpoints every
    ``train.checkpoint_every_steps`` and where a stop is asked for (at the epoch's end its own comes first)."""
    tc = run.config.train
    for images, idx, _vid, _cam in loader:
        count = run.world.total(len(idx))  # the global batch's samples (this rank has its share of them)
        run.position += count
        if not _trainable(run, idx, count):  # the order stays the same on resume
            if tc.refresh == "published":
                _fill_rows(run, ep.cache, _inputs(run, images, idx, run.epoch), idx)
            continue
        _trace_rows(run, idx)
        began = time.perf_counter()
        loss = _train_step(run, ep, images, idx)
        run.step_seconds.append(time.perf_counter() - began)
        ep.losses.append(loss)
        ep.seen += count
        run.step += 1
        run.scalars.step(run.step, loss, {g["name"]: g["lr"] for g in run.optimizer.param_groups})
        run.steps_here += 1
        run.progress(f"epoch {run.epoch}", count, run.n)
        run.partial = {"losses": ep.losses, "seen": ep.seen, "mined": ep.mined}
        fault_point(f"step:{run.steps_here}")
        within = run.position < run.n
        stopping = run.should_stop() and within
        if within and (stopping or tc.checkpoint_every_steps and run.step % tc.checkpoint_every_steps == 0):
            _checkpoint(run, ep.cache, run.partial)
        if stopping:
            run.stop_here()
        fault_point(f"after-step:{run.steps_here}")


def _inputs(run: _Run, images, idx: torch.Tensor, key: int) -> torch.Tensor:
    """The batch on the device, decoded there with ``train.decode_on_device``, augmented with ``key``.

    A rank's share of a short last batch may be empty: it still runs the forward (its BatchNorm layers
    and DDP take part in the ranks' collectives), on an empty batch."""
    size = tuple(run.config.model.image_size)
    if len(idx) == 0:
        return torch.zeros((0, 3, *size), device=run.device)
    if run.config.train.decode_on_device:  # the workers left the images encoded
        images = decode_batch(images, size, run.device)
    return run.augment(images.to(run.device, non_blocking=True), idx, key)


def _train_step(run: _Run, ep: _Epoch, images, idx: torch.Tensor) -> float:
    """One step on a batch of two or more: forward, the step's positives, the dictionary step; its loss.

    The step's whole body, so that a run over several processes can swap in its own dictionary step.
    """
    config = run.config
    x = _forward(run.net, _inputs(run, images, idx, run.epoch))
    if run.world.distributed:
        return sharded_step(
            run.world,
            x,
            idx,
            ep.cache,
            run.positives,
            config.loss.r,
            config.loss.delta,
            run.optimizer,
            share=run.share,
            gather_rows=run.gather_rows,
            cameras=run.cameras,
        )
    if ep.per_batch:
        used = _mine_batch(ep.cache, idx.numpy(), config, ep.labels, ep.mined)
    else:
        used = run.positives
    return dictionary_step(
        x,
        idx,
        ep.cache,
        used,
        config.loss.r,
        config.loss.delta,
        run.optimizer,
        gather_rows=run.gather_rows,
        graph=ep.graph,
        of_batch=ep.per_batch,
        cameras=run.cameras,
    )


def _epoch_record(run: _Run, ep: _Epoch) -> dict:
    """The epoch's line of the history."""
    tc = run.config.train
    quality = _positives_quality(ep.mined if ep.per_batch else None, run.positives, run.store.ids())
    return {
        "epoch": run.epoch,
        "loss": float(np.mean(ep.losses)) if ep.losses else None,
        "steps": len(ep.losses),
        "warmup": tc.is_warmup(run.epoch),
        "mining": tc.mining,
        "precision": quality["precision"],
        "recall": quality["recall"],
        "mean_positives": quality["mean_positives"],
        "share_with_others": quality["share_with_others"],
        "groups": quality["groups"],
        "largest_group": quality["largest_group"],
        "images_per_s": ep.seen / (time.perf_counter() - ep.began),
        "peak_rss_bytes": peak_rss_bytes(),
        "lr": tc.lr_at(run.epoch),
        "transductive": tc.transductive,
        "negatives": run.config.loss.negatives,
        "refresh": tc.refresh,
        "oracle": run.config.mining.oracle,  # positives from the vehicle ids: a ceiling, not a result
        "camera": sorted(k for k, on in run.camera.items() if on),  # the camera-aware pieces used
    }


def _finish(run: _Run) -> dict:
    """After the last epoch: the final model, the curves and the run's report."""
    tc = run.config.train
    if tc.epochs == 0 or not run.history:
        # the untrained baseline (--epochs 0): the dictionary is the initial model's features
        _extract(run, should_stop=False)
    ranks = _ranks_report(run)
    if not run.world.main:
        return {"rank": run.world.rank}
    model_path = save_model(
        run.run_dir / "model.pt",
        run.model,
        run.config.to_dict(),
        # the shards: where 'wildreid export' finds images to check an export on
        {"history": run.history, "transductive": tc.transductive, "shards": str(Path(run.shards).resolve())},
    )
    _plot(run.run_dir, run.history)
    run.scalars.close()
    return {
        "checkpoint": str(model_path),
        "weights_sha256": weights_sha256(run.model),
        "dictionary_sha256": dictionary_sha256(run.store),
        "history": run.history,
        "epochs": tc.epochs,
        "pretrained": run.model.pretrained_from,
        "transductive": tc.transductive,
        # this process's page cache counts (not the run's: a resumed run starts them at 0)
        "page_cache": {"device_budget_bytes": run.on_device, **run.cache_stats},
        "memory": {**asdict(run.memory), "budget_covers": "the process tree's USS"},
        "world": ranks,
    }


def _ranks_report(run: _Run) -> dict:
    """Every rank's share of the run: dictionary rows owned, dictionary bytes held at once, and what it put into
    collectives per step (payload bytes, by kind; bench_ddp.py reads it)."""
    world = run.world
    steps = max(run.steps_here, 1)
    kinds = ("features", "rows", "candidates", "gradients", "sums", "flags", "gathers")
    mine = torch.tensor(
        [*run.span, run.cache_stats.get("held_bytes", 0), *(world.traffic.get(k, 0) / steps for k in kinds)],
        dtype=torch.float64,
        device=world.comm_device,
    )
    every = world.cat(mine[None]).cpu().numpy()
    return {
        "size": world.size,
        # the median step of this invocation (forward, DTL, backward, optimizer, momentum update; no data loading)
        "seconds_per_step": float(np.median(run.step_seconds)) if run.step_seconds else None,
        "rows": [[int(r[0]), int(r[1])] for r in every],
        "dictionary_bytes_held": [int(r[2]) for r in every],
        "bytes_per_step": [{k: int(v) for k, v in zip(kinds, r[3:])} for r in every],
    }


def dictionary_step(
    x: torch.Tensor,
    idx: torch.Tensor,
    cache: PageCache,
    positives,
    r: float,
    delta: float,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    gather_rows: int = 4096,
    graph: Callable[[np.ndarray], np.ndarray] | None = None,
    of_batch: bool = False,
    cameras: Cameras | None = None,
) -> float:
    """One DTL step against the dictionary behind ``cache``: loss, backward, optimizer step, momentum update.

    ``positives`` is the CSR over all N rows, or with ``of_batch`` the batch's own CSR
    (its row b lists the positives of ``idx[b]``, as ``dplm_rows`` returns them).

    Hard negatives stream the dictionary page by page without grad; only the
    selected rows are gathered again with grad (wildreid.dtl), so memory is
    bounded by the cache budget and ``gather_rows`` (rows gathered at once), not by N:
    the hard negatives alone are r * N rows per batch element. With ``graph``
    (``rows -> (B, K)`` k-NN graph rows, ``wildreid.mining.graph_reader``) they are
    picked among the graph neighbours instead, and only those rows are read.
    ``cameras``: the camera-aware terms of ``wildreid.dtl`` (own-camera negatives, inter-camera term).
    """
    device = x.device
    rows = idx.to(device)
    cut = torch.arange(len(rows), device=device) if of_batch else rows
    pos_ptr, pos_idx = batch_positives(positives[0], positives[1], cut, device=device)
    rows_fn = lambda ids: cache.get_rows_tensor(_np(ids), device).float()  # noqa: E731
    if graph is None:
        out = dtl_streaming(
            x,
            _blocks(cache, device),
            rows_fn,
            rows,
            pos_ptr,
            pos_idx,
            r,
            delta,
            count=cache.n,
            chunk_rows=gather_rows,
            cameras=cameras,
        )
    else:
        hard, _ = graph_negatives(
            x, graph(idx.numpy()), rows_fn, pos_ptr, pos_idx, rows, r, count=cache.n, chunk_rows=gather_rows
        )
        out = dtl_loss(x, rows_fn, rows, pos_ptr, pos_idx, hard, delta, chunk_rows=gather_rows)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if optimizer is not None:
        optimizer.step()
    current = cache.get_rows_tensor(idx.numpy(), device).float()
    cache.set_rows(idx.numpy(), momentum_update(current, x.detach().float(), rows).cpu().numpy())
    return float(out["loss"].detach())


def refresh_features(model: torch.nn.Module, batch: torch.Tensor, train_mode: bool | None = None) -> torch.Tensor:
    """One batch of the published dictionary rebuild: the model's features without grad, in train mode.

    Train mode is the point (lib/trainer.py runs the rebuild after ``model.train()``):
    BatchNorm uses the batch's statistics and updates its running statistics as a
    training forward pass does. A one-sample batch is taken in eval mode instead
    (``train_mode``: whether the global batch, of which ``batch`` is a share, has two or more).
    """
    with torch.no_grad():
        if not (len(batch) >= 2 if train_mode is None else train_mode):
            was_training = model.training
            model.eval()
            try:
                return _forward(model, batch)
            finally:
                model.train(was_training)
        return _forward(model, batch)


def _forward(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The training forward: bf16 autocast and channels-last on the GPU; the same step on the CPU."""
    if batch.device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(batch.contiguous(memory_format=torch.channels_last)).float()
    return model(batch)


def _trace_rows(run: _Run, idx: torch.Tensor) -> None:
    """Test hook: WILDREID_TRACE_ROWS=<prefix> appends each step's rows of this rank to <prefix>.rank<r>
    (epoch, step, rows), so tests can check which samples a resumed run of another world size trains on."""
    prefix = os.environ.get("WILDREID_TRACE_ROWS")
    if prefix:
        with open(f"{prefix}.rank{run.world.rank}", "a") as f:
            f.write(f"{run.epoch} {run.step + 1} {' '.join(map(str, idx.tolist()))}\n")


def _trainable(run: _Run, idx: torch.Tensor, count: int) -> bool:
    """Whether BatchNorm can train on this global batch of ``count``: two samples or more, and on every rank
    when each normalises its own share (``train.sync_bn`` off); else its rows are filled without a step."""
    if count < 2:
        return False
    if run.world.distributed and not run.config.train.sync_bn:
        return run.world.least(len(idx)) >= 2
    return True


def _set_owned_rows(run: _Run, cache: PageCache, x: torch.Tensor, idx: torch.Tensor) -> None:
    """Rows ``idx`` of the global batch set to ``x`` by the ranks that own them (features gathered first)."""
    x, rows = run.world.gather_batch(x.detach(), idx.to(x.device), run.share)
    own = owned(cache, rows)
    cache.set_rows(rows.cpu().numpy()[own], x.cpu().numpy()[own])


def _fill_rows(run: _Run, cache: PageCache, batch: torch.Tensor, idx: torch.Tensor) -> None:
    """Momentum update of the rows of a global batch too small to train on (fewer than two samples) from
    their eval-mode features, without a step; each row updated by the rank that owns it."""
    x = refresh_features(run.model, batch, train_mode=False).float()
    update_owned(cache, *run.world.gather_batch(x, idx.to(x.device), run.share))


def _check_world(config: Config, world: World) -> None:
    """What a run of several processes cannot do (yet), refused before anything is written."""
    if not world.distributed:
        return
    check_world_size(config.train.batch_size, world.size)
    if config.loss.negatives == "graph" or config.train.mining == "batch":
        raise ConfigError(
            "loss.negatives=graph and train.mining=batch run in one process only for now; "
            "use loss.negatives=exact and train.mining=epoch with --nproc-per-node or torchrun"
        )


def _check_rows_per_rank(store: FeatureStore, n: int, world: World) -> None:
    chunks = -(-n // store.chunk_rows)
    if chunks < world.size:
        raise ConfigError(
            f"the dictionary has {chunks} chunks of {store.chunk_rows} rows and every one of {world.size} processes "
            f"must own one; use at most {chunks} processes"
        )


def collective_failure(exc: BaseException) -> str | None:
    """The first line of a torch.distributed backend error (a peer gone, a timeout), or None for other errors."""
    text = str(exc).strip()
    markers = ("gloo", "NCCL", "nccl", "Timed out", "timed out", "Connection closed", "Connection reset", "Broken pipe")
    if isinstance(exc, torch.distributed.DistError) or any(m in text for m in markers):
        line = text.splitlines()[0] if text else type(exc).__name__
        return line.split("] ", 1)[-1][:200]  # without gloo's source-file prefix
    return None


def _plan_memory(budget: int, model, n: int, config: Config, device, use_graph: bool) -> RunMemory:
    """``--memory-budget`` split over the whole process tree (``wildreid.run_budget``), or a ConfigError naming
    the smallest budget that works. ``n``: the dictionary's rows."""
    tc, m = config.train, config.mining
    dim, itemsize = ARCHS[config.model.arch][1], np.dtype(config.dictionary.dtype).itemsize
    chunk_rows = min(rows_per_chunk(dim * itemsize), n)  # the store's (FeatureStore.create)
    h, w = config.model.image_size
    on_host = device.type != "cuda"  # on CUDA the activations live in device memory
    mining = smallest_budget(n, dim, itemsize, min(m.k, n), m.adjacency, max(1, tc.workers), chunk_rows)
    least_rest = max(
        2 * mining,  # mining gets half
        4 * chunk_rows * dim * itemsize,  # the cache (half, less an eighth for the graph) holds a page
        8 * 256 * dim * 12,  # gathers (an eighth) hold 256 rows
        8 * 2 * min(GRAPH_CHUNK_ROWS, n) * m.k * 8 if use_graph else 0,  # the graph cache holds a page
    )
    saved, largest = activation_bytes(model, (h, w), device) if on_host else (0, 0)
    extract_batch = min(chunk_rows, EXTRACT_BATCH)
    return plan_run_memory(
        budget,
        process=process_uss(),
        weights=sum(p.numel() * p.element_size() for p in model.parameters()),
        saved=saved,
        largest=largest,
        batch=tc.batch_size,
        extract_batch=extract_batch,
        image_bytes=3 * h * w * 4,
        extract_rows_bytes=(chunk_rows + extract_batch) * dim * 4,
        workers=tc.workers,
        least_rest=least_rest,
        use_graph=use_graph,
    )


def _check_batch_mining(n: int, dim: int, batch: int, adjacency: int, budget: int) -> None:
    need = dplm_rows_bytes(n, dim, batch, adjacency)
    if need > budget // 4:
        raise ConfigError(
            f"train.mining=batch mines each batch against the whole dictionary: N = {n:,} needs "
            f"{need / 2**20:,.1f} MiB, more than a quarter of the memory budget "
            f"({budget / 2**20:,.1f} MiB); use train.mining=epoch "
            "or a larger --memory-budget"
        )


def _labels(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, images per id): what ``quality_sums`` scores positives against."""
    return ids, np.bincount(np.maximum(ids, 0))


def _mine_batch(cache: PageCache, rows: np.ndarray, config: Config, labels, mined: dict):
    """DPLM positives of ``rows`` against the live dictionary; adds their quality sums to ``mined``."""
    m = config.mining
    found = dplm_rows(
        cache.read(0, cache.n),
        rows,
        threshold=m.threshold,
        min_candidates=m.min_candidates,
        adjacency=m.adjacency,
        order=m.order,
    )
    sums = quality_sums(rows, *found, *labels)
    for key in ("rows", "positives", "precision", "recall"):
        mined[key] = None if mined[key] is None or sums[key] is None else mined[key] + sums[key]
    if "with_others" in mined:  # (absent from the partial epochs of older checkpoints)
        batch_row = np.repeat(np.arange(len(rows)), np.diff(found[0]))
        others = np.asarray(found[1]) != np.asarray(rows)[batch_row]
        mined["with_others"] += int(np.count_nonzero(np.bincount(batch_row[others], minlength=len(rows))))
    return found


def _positives_quality(mined: dict | None, positives, ids: np.ndarray) -> dict:
    """The epoch's positives: precision and recall (None unless every id is known) and the label-free
    statistics (``wildreid.label_free``). ``mined``: the sums of a batch-mining epoch, whose steps' positives
    form no one graph (no groups); None: the epoch's CSR ``positives``."""
    if mined is not None:
        rows = max(mined["rows"], 1)
        share = mined["with_others"] / rows if "with_others" in mined else None
        return {**quality_means(mined), "share_with_others": share, "groups": None, "largest_group": None}
    return {**pseudo_label_quality(*positives, ids), **positives_stats(*positives)}


def _np(ids) -> np.ndarray:
    return ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)


def _page_bytes(store: FeatureStore) -> int:
    return store.chunk_rows * store.dim() * store.features.dtype.itemsize


def _blocks(cache: PageCache, device):
    # device pages are scanned where they are: no copy through the host
    yield from cache.scan_tensors(device)


def _plain(value):
    """Plain Python values only (NumPy scalars become floats and ints): what a checkpoint may hold."""
    return json.loads(json.dumps(value))


def _write_history(run_dir: Path, history: list[dict]) -> None:
    atomic_write(run_dir / "history.jsonl", "".join(json.dumps(h, sort_keys=True) + "\n" for h in history))


def _plot(run_dir: Path, history: list[dict]) -> None:
    if history:
        training_curves(history, run_dir / "curves.png")
