"""The API's commands that read images into tensors or run the network: inspect, train, evaluate, visualize,
embed, search and export."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from wildreid.api.common import Log, Progress, StopAsked, as_bytes, as_size, never, no_log, no_progress
from wildreid.api.launching import train_overrides
from wildreid.budget import default_budget
from wildreid.checkpoint import load_model
from wildreid.config import load_config
from wildreid.core.errors import ConfigError
from wildreid.embedding import checkpoint_digest
from wildreid.embedding import embed as embed_source
from wildreid.evaluation import evaluate_groups, require_vehicle_ids, write_results
from wildreid.exporting import export_checkpoint
from wildreid.extract import extract_split
from wildreid.plots import cmc_curve, render_ranked_lists, training_curves
from wildreid.retrieval import check_pictures, render_search
from wildreid.retrieval import search as search_gallery
from wildreid.run_budget import run_within
from wildreid.shards import load_manifest
from wildreid.shards.reader import read_back, split_entry
from wildreid.stores import FeatureStore, WriterLock, writable_group
from wildreid.training import TrainOptions
from wildreid.training import train as train_store
from wildreid.world import join_world, leave_world

__all__ = [
    "EVAL_SPLITS",
    "check_device",
    "embed",
    "evaluate",
    "export",
    "inspect",
    "search",
    "train",
    "visualize",
]


def check_device(device: str) -> None:
    """ConfigError, not a torch traceback, for a device this machine cannot use."""
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ConfigError(f"expected --device cpu or cuda, found {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for but CUDA is not available here; use --device cpu")


def inspect(shards: str | Path, *, image_size: str | Sequence[int] = "256x128", workers: int = 0) -> dict:
    """Read every split of ``shards`` back and check it: split -> samples, vehicles, cameras, images/s."""
    manifest = load_manifest(shards)
    size = as_size(image_size)
    return {split: read_back(shards, split, image_size=size, workers=workers) for split in manifest["splits"]}


def train(
    shards: str | Path,
    store: str | Path,
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    epochs: int | None = None,
    resume: bool = False,
    memory_budget: int | str | None = None,
    device: str = "cpu",
    device_budget: int | str | None = None,
    pretrained: str | None = None,
    checkpoint_every: int | None = None,
    max_steps: int | None = None,
    deterministic: bool = False,
    transductive: bool = False,
    decode_on_device: bool = False,
    tensorboard: str | Path | None = None,
    collective_timeout: float = 600.0,
    progress: Progress = no_progress,
    should_stop: StopAsked = never,
    log: Log = no_log,
) -> dict | None:
    """Train (or ``resume``) SSML-FD on the train split of ``shards`` into the run folder ``store``.

    ``overrides`` are ``section.key=value`` strings, as ``--set``. Under torchrun this process joins the run
    as its rank; only rank 0 reports (the other ranks return None) and only rank 0's callbacks are called.
    """
    cfg = load_config(
        config,
        train_overrides(
            overrides,
            epochs=epochs,
            checkpoint_every=checkpoint_every,
            pretrained=pretrained,
            transductive=transductive,
            decode_on_device=decode_on_device,
        ),
    )
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"expected --max-steps >= 1, found {max_steps}")
    options = TrainOptions(
        resume=resume,
        memory_budget=as_bytes(memory_budget),
        device=device,
        deterministic=deterministic,
        device_budget=as_bytes(device_budget),
        max_steps=max_steps,
        tensorboard=None if tensorboard is None else str(tensorboard),
    )
    world = join_world(device, collective_timeout)
    try:
        report = train_store(
            shards,
            store,
            cfg,
            options,
            progress=progress if world.main else no_progress,
            should_stop=should_stop,
            log=log if world.main else no_log,
            world=world,
        )
    finally:
        leave_world(world)
    return report if world.main else None


# --------------------------------------------------------------------------- evaluation

EVAL_SPLITS = {
    "small": ["small"],
    "medium": ["medium"],
    "large": ["large"],
    "all": ["small", "medium", "large"],
    "veri776": ["veri776"],
}
_EVAL_PAIRS = {
    **{name: (f"query-{name}", f"gallery-{name}") for name in ("small", "medium", "large")},
    "veri776": ("query", "gallery"),
}


def evaluate(
    *,
    query: str | Path | None = None,
    gallery: str | Path | None = None,
    shards: str | Path | None = None,
    checkpoint: str | Path | None = None,
    split: str = "small",
    features_dir: str | Path | None = None,
    rerank: bool = False,
    camera_norm: bool = False,
    memory_budget: int | str | None = None,
    device: str = "cpu",
    output: str | Path | None = None,
    feature: str | None = None,
    progress: Progress = no_progress,
    should_stop: StopAsked = never,
    log: Log = no_log,
) -> dict:
    """mAP, mINP and CMC, blockwise: of the feature groups ``query`` against ``gallery`` (one result), or of a
    ``checkpoint`` on the query/gallery splits of ``shards`` named by ``split`` (split -> result, extracted to
    ``features_dir``). Results (``cmc`` included) are written to ``output`` with a CMC picture per split;
    with a checkpoint ``output`` defaults to CKPT_DIR/eval-SPLIT.json. Logs where the results went."""
    if (query is None) != (gallery is None) or (shards is None) != (checkpoint is None):
        raise ConfigError("expected --query with --gallery, or --shards with --checkpoint; one of a pair is missing")
    if (query is None) == (shards is None):
        raise ConfigError(
            "expected either --query/--gallery (existing feature groups) or --shards/--checkpoint "
            "(extract, then evaluate), not both and not neither"
        )
    if split not in EVAL_SPLITS:
        raise ConfigError(f"expected --split to be one of {', '.join(EVAL_SPLITS)}, found {split!r}")
    check_device(device)
    budget = as_bytes(memory_budget) or default_budget()

    def score(q: Path, g: Path) -> dict:
        return run_within(
            budget,
            lambda left: evaluate_groups(
                q, g, memory_budget=left, device=device, rerank=rerank, camera_norm=camera_norm
            ),
            what="evaluation",
        )

    tag = ("-rerank" if rerank else "") + ("-camnorm" if camera_norm else "")
    if query is not None:
        result = score(Path(query), Path(gallery))
        if output is not None:
            _save(Path(output), result, {Path(output).stem: (Path(query).name, result)}, log)
        return _without_cmc(result)
    checkpoint = Path(checkpoint)
    results = _evaluate_checkpoint(
        Path(shards), checkpoint, split, features_dir, feature, device, score, progress, should_stop, log
    )
    output = checkpoint.parent / f"eval-{split}{tag}.json" if output is None else Path(output)
    _save(output, results, {f"eval-{name}{tag}": (name, r) for name, r in results.items()}, log)
    return {name: _without_cmc(r) for name, r in results.items()}


def _without_cmc(result: dict) -> dict:
    return {key: value for key, value in result.items() if key != "cmc"}


def _save(output: Path, saved: dict, curves: dict[str, tuple[str, dict]], log: Log) -> None:
    """The results JSON, and a CMC picture per ``stem: (label, result)``."""
    log(f"results: {write_results(output, saved)}")
    for stem, (label, result) in curves.items():
        cmc_curve(result["cmc"], output.with_name(f"{stem}-cmc.png"), label=label)


def _evaluate_checkpoint(shards, checkpoint, split, features_dir, feature, device, score, progress, should_stop, log):
    wanted = [(name, *_EVAL_PAIRS[name]) for name in EVAL_SPLITS[split]]
    sizes = {s: split_entry(shards, s)["num_samples"] for _, q, g in wanted for s in (q, g)}  # before the model
    for _, q_split, g_split in wanted:
        require_vehicle_ids(shards, q_split, g_split)
    model, config = load_model(checkpoint, device)
    feature = feature or config["model"].get("eval_feature", "bnneck")
    if feature not in ("bnneck", "pool5"):
        raise ConfigError(f"expected --feature bnneck or pool5, found {feature!r}")
    label = checkpoint_digest(checkpoint)  # extract_split re-extracts rows of another checkpoint
    folder = Path(features_dir) if features_dir is not None else checkpoint.parent / "features"
    transductive = bool(config.get("train", {}).get("transductive", False))
    results = {}
    for name, q_split, g_split in wanted:
        # both groups stay locked until they are evaluated: another eval writing into the same
        # --features-dir (another checkpoint) would otherwise swap rows under this one
        with contextlib.ExitStack() as held:
            for s in (q_split, g_split):
                held.enter_context(WriterLock(folder / s, log=log))
                extract_split(
                    shards,
                    s,
                    model,
                    writable_group(folder / s, sizes[s], model.feature_dim, other="--features-dir"),
                    image_size=tuple(config["model"]["image_size"]),
                    device=device,
                    progress=progress,
                    label=label,
                    should_stop=should_stop,
                    feature=feature,
                )
            results[name] = score(folder / q_split, folder / g_split)
        results[name].update(
            query_split=q_split,
            gallery_split=g_split,
            checkpoint_sha256=label,
            feature=feature,
            transductive=transductive,
        )
    return results


def visualize(
    *,
    shards: str | Path,
    query: str | Path,
    gallery: str | Path,
    query_split: str,
    gallery_split: str,
    out: str | Path,
    queries: Sequence[int] | None = None,
    num: int = 6,
    k: int = 10,
    rerank: bool = False,
    memory_budget: int | str | None = None,
    device: str = "cpu",
    history: str | Path | None = None,
    curves: str | Path | None = None,
) -> dict:
    """Ranked lists of ``queries`` (default: the first ``num`` with a true match) as a PNG at ``out``, and the
    training curves of a ``history.jsonl``; returns ``{"queries", "ranked_lists", "curves", "epochs"}``."""
    if k < 1 or num < 1:
        raise ConfigError(f"expected --k and --num >= 1, found {k} and {num}")
    check_device(device)
    records = _history(Path(history)) if history is not None else []  # first: a bad history fails fast
    qs, gs = FeatureStore.open(query), FeatureStore.open(gallery)
    chosen = list(queries) if queries is not None else _matched_queries(qs, gs, num, query, gallery)
    if not chosen:
        raise ConfigError("--queries is empty; give row numbers such as 0,5,9 or leave it out")
    out = Path(out)
    path = render_ranked_lists(
        shards,
        query_split,
        gallery_split,
        qs,
        gs,
        chosen,
        out,
        k=k,
        memory_budget=as_bytes(memory_budget),
        device=device,
        rerank=rerank,
    )
    drawn = None
    if history is not None:
        drawn = training_curves(
            records, Path(curves) if curves is not None else out.with_name(f"{out.stem}-curves.png")
        )
    return {"queries": chosen, "ranked_lists": str(path), "curves": drawn and str(drawn), "epochs": len(records)}


def _history(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"history {path} does not exist; expected the history.jsonl of a training run")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} line {n} is not JSON ({exc.msg}); expected one object per line") from None
    return records


def _matched_queries(qs: FeatureStore, gs: FeatureStore, num: int, query, gallery) -> list[int]:
    """The first ``num`` query rows whose vehicle another camera of the gallery saw."""
    cams_of: dict[int, set] = {}
    for vid, cam in zip(gs.ids().tolist(), gs.camids().tolist()):
        cams_of.setdefault(vid, set()).add(cam)
    chosen = [
        q
        for q, (vid, cam) in enumerate(zip(qs.ids().tolist(), qs.camids().tolist()))
        if vid >= 0 and cams_of.get(vid, set()) - {cam}
    ][:num]
    if not chosen:
        raise ConfigError(f"no query of {query} has a true match in {gallery} (same id, another camera)")
    return chosen


# --------------------------------------------------------------------------- embed, search, export


def embed(
    src: str | Path,
    *,
    checkpoint: str | Path,
    output: str | Path,
    split: str | None = None,
    camera_from: str | None = None,
    memory_budget: int | str | None = None,
    device: str = "cpu",
    chunk_rows: int | None = None,
    feature: str | None = None,
    progress: Progress = no_progress,
    should_stop: StopAsked = never,
    log: Log = no_log,
) -> dict:
    """Embed every image of ``src`` (shards with ``split``, an image folder or a list) into the feature group
    ``output`` (resumable); returns the report."""
    check_device(device)
    return embed_source(
        src,
        checkpoint,
        output,
        split=split,
        camera_from=camera_from,
        memory_budget=as_bytes(memory_budget),
        device=device,
        chunk_rows=chunk_rows,
        feature=feature,
        progress=progress,
        should_stop=should_stop,
        log=log,
    )


def search(
    *,
    gallery: str | Path,
    query: str | Path,
    checkpoint: str | Path | None = None,
    top_k: int = 20,
    index: str = "exact",
    nlist: int | None = None,
    nprobe: int | None = None,
    memory_budget: int | str | None = None,
    device: str = "cpu",
    picture: str | Path | None = None,
    progress: Progress = no_progress,
    log: Log = no_log,
) -> list[dict]:
    """Ranked gallery images of a query image (with ``checkpoint``) or of every row of a query group: one dict
    per query (``query``, ``results``: rank, similarity, key, row); ``picture``: also a PNG of the first 8."""
    check_device(device)
    if picture is not None:  # before the search, not after it
        check_pictures(gallery, query)
    result = search_gallery(
        gallery,
        query,
        checkpoint=checkpoint,
        k=top_k,
        index=index,
        nlist=nlist,
        nprobe=nprobe,
        memory_budget=as_bytes(memory_budget),
        device=device,
        progress=progress,
    )
    if picture is not None:
        log(f"picture: {render_search(result, picture)}")
    return result.results


def export(
    checkpoint: str | Path,
    *,
    format: str,  # noqa: A002 - the option is --format
    output: str | Path,
    shards: str | Path | None = None,
    split: str | None = None,
    feature: str | None = None,
    tolerance: float | None = None,
    dry_run: bool = False,
) -> dict:
    """Export the embedding network of ``checkpoint`` as ONNX or TorchScript to ``output``, checked against
    PyTorch on shard images first (``dry_run``: checked, nothing written); returns the check's report."""
    return export_checkpoint(
        checkpoint, format, output, shards, split=split, feature=feature, atol=tolerance, dry_run=dry_run
    )
