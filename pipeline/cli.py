"""The ``wildreid`` command line: each command parses options and calls one library function."""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from wildreid import api
from wildreid.core.errors import ConfigError, Stopped, StoreError, WildreidError
from wildreid.core.signals import GracefulStop
from wildreid.core.units import format_bytes

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Out-of-core unsupervised vehicle re-identification (SSML-FD).",
)
console = Console(stderr=True)
out = Console()


def friendly(command):
    """Turn wildreid's own errors into one line on stderr and the error's exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Stopped as exc:
            if _rank() in ("", "rank 0: "):  # every rank stops at the same step: one says so
                console.print(f"[yellow]{escape(str(exc))}[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except WildreidError as exc:
            # escaped: messages name things like wildreid[export] that rich would read as markup
            console.print(f"[bold red]error:[/] {_rank()}{escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: re-run the same command to resume")
            raise typer.Exit(130) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
                raise
            console.print(
                f"[bold red]error:[/] cannot write {escape(str(exc.filename or 'output'))}: {exc.strerror}; "
                "finished work is kept: free space (or fix permissions) and re-run to resume",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(StoreError.exit_code) from None

    return wrapper


def _rank() -> str:
    """'rank R: ' in a rank of a distributed run (torchrun's environment), so every error names its rank."""
    return f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def _say(message: str) -> None:
    console.print(message, highlight=False, soft_wrap=True)


def _echo(line: str) -> None:
    """A line of another process's output, as it is (no markup)."""
    console.print(escape(line), highlight=False)


class RichProgress:
    """A progress bar per phase, fed by the library's ``progress(phase, advance, total)`` calls."""

    def __init__(self):
        self.bar = Progress(
            TextColumn("{task.description:<18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=not console.is_terminal and not _force_progress(),
        )
        self.tasks: dict[str, int] = {}

    def __call__(self, phase: str, advance: int, total: int) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(phase, total=total)
        self.bar.advance(self.tasks[phase], advance)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)


def _force_progress() -> bool:
    return os.environ.get("WILDREID_PROGRESS") == "1"


@app.command()
@friendly
def synth(
    out_dir: Path = typer.Argument(..., metavar="OUT", help="New folder for the dataset (VeRi-Wild layout)."),
    train_vehicles: int = typer.Option(120, help="Vehicles in the train split."),
    test_vehicles: int = typer.Option(40, help="Vehicles in the test splits (large; small/medium are 30%/50%)."),
    images_per_vehicle: int = typer.Option(8, help="Images of every vehicle."),
    cameras: int = typer.Option(12, help="Number of cameras."),
    image_size: str = typer.Option("96x96", help="Base crop size HEIGHTxWIDTH; cameras scale it 0.6-1.4x."),
    seed: int = typer.Option(0, help="Same seed, byte-identical dataset."),
    workers: int = typer.Option(1, help="Processes drawing images."),
    preview: Optional[Path] = typer.Option(None, help="Also write a PNG grid: one row per vehicle."),
):
    """Write a synthetic vehicle Re-ID dataset in the VeRi-Wild layout."""
    with RichProgress() as progress:
        summary = api.synth(
            out_dir,
            train_vehicles=train_vehicles,
            test_vehicles=test_vehicles,
            images_per_vehicle=images_per_vehicle,
            cameras=cameras,
            image_size=image_size,
            seed=seed,
            workers=workers,
            preview=preview,
            progress=progress,
        )
    out.print(f"wrote {(train_vehicles + test_vehicles) * images_per_vehicle} images to {out_dir}")
    if preview is not None:
        out.print(f"preview: {summary.pop('preview')}")
    out.print(json.dumps(summary, sort_keys=True), highlight=False, soft_wrap=True)


@app.command()
@friendly
def shard(
    src: Path = typer.Argument(
        ..., help="Dataset folder, or the .csv file of --layout list (with --verify, the shard folder)."
    ),
    out_dir: Optional[Path] = typer.Argument(None, metavar="OUT", help="Folder for the shards and manifest.json."),
    layout: str = typer.Option(
        "auto",
        help="auto, veriwild, veri776, flat, folder (every image below SRC, no ids) or list (SRC is a CSV list: "
        "path and optional vid, camid, split columns).",
    ),
    camera_from: Optional[str] = typer.Option(
        None,
        help="With --layout folder: cameras from the N-th folder level (level:1) or a regex group camera on "
        "the relative path ('regex:c(?P<camera>\\d+)'); default: unknown (-1).",
    ),
    max_samples: int = typer.Option(10_000, help="At most this many samples per shard."),
    max_bytes: str = typer.Option("1GiB", help="At most this many bytes per shard (e.g. 256MiB)."),
    workers: int = typer.Option(1, help="Processes scanning images and writing shards."),
    strict: bool = typer.Option(False, help="Fail on the first bad image instead of skipping and listing it."),
    verify: bool = typer.Option(False, help="Re-check every shard of SRC against its manifest and exit."),
):
    """Pack a dataset into WebDataset tar shards (deterministic, resumable)."""
    if out_dir is None and not verify:
        raise typer.BadParameter("OUT is required unless --verify is given")
    with RichProgress() as progress, GracefulStop() as stop:
        manifest = api.shard(
            src,
            out_dir,
            layout=layout,
            camera_from=camera_from,
            max_samples=max_samples,
            max_bytes=max_bytes,
            workers=workers,
            strict=strict,
            verify=verify,
            progress=progress,
            should_stop=stop,
            log=_say,
        )
    if verify:
        out.print(f"all shards in {src} match the manifest")
    else:
        _print_manifest(manifest)


def _print_manifest(manifest: dict) -> None:
    table = Table(title=f"shards of {manifest['source']} ({manifest['layout']})")
    for col in ("split", "samples", "shards", "size", "vehicles", "cameras"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, split in manifest["splits"].items():
        table.add_row(
            name,
            str(split["num_samples"]),
            str(len(split["shards"])),
            format_bytes(split["num_bytes"]),
            str(split["num_vehicles"])
            + (f" ({split['num_unlabelled']} unknown)" if split.get("num_unlabelled") else ""),
            str(split["num_cameras"]),
        )
    out.print(table)
    skipped = manifest["skipped"]
    if skipped:
        out.print(f"[yellow]skipped {len(skipped)} bad input(s)[/] (listed in manifest.json):", highlight=False)
        for s in skipped[:20]:
            out.print(f"  {s['path']}: {s['reason']}", highlight=False, soft_wrap=True)
        if len(skipped) > 20:
            out.print(f"  ... and {len(skipped) - 20} more")


@app.command()
@friendly
def inspect(
    shards: Path = typer.Argument(..., help="Shard folder written by 'wildreid shard'."),
    image_size: str = typer.Option("256x128", help="Decode and resize to HEIGHTxWIDTH."),
    workers: int = typer.Option(0, help="DataLoader workers."),
    as_json: bool = typer.Option(False, "--json", help="Print one final JSON line."),
):
    """Read every split back from its shards, check it, and print a summary table."""
    rows = api.inspect(shards, image_size=image_size, workers=workers)
    table = Table(title=f"read back from {shards}")
    for col in ("split", "samples", "vehicles", "cameras", "images/s"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for r in rows.values():
        table.add_row(r["split"], str(r["samples"]), str(r["vehicles"]), str(r["cameras"]), f"{r['images_per_s']:.0f}")
    out.print(table)
    if as_json:
        print(json.dumps(rows, sort_keys=True))


class TrainOption:
    """``wildreid train``'s options, declared apart so that the command reads as parse, call, print."""

    shards = Annotated[Path, typer.Option(help="Shard folder written by 'wildreid shard' (its train split is used).")]
    store = Annotated[Path, typer.Option(help="Run folder: the dictionary store, checkpoints, history and model.pt.")]
    config = Annotated[
        Optional[Path], typer.Option(help="YAML config (configs/veriwild.yaml, veri776.yaml, demo.yaml).")
    ]
    epochs = Annotated[Optional[int], typer.Option(help="Override train.epochs (0 writes the untrained baseline).")]
    resume = Annotated[bool, typer.Option("--resume", help="Continue from the last complete checkpoint in STORE.")]
    memory_budget = Annotated[
        Optional[str],
        typer.Option(
            help="Host memory of the whole run: this process and its DataLoader workers (summed USS), e.g. 4GiB; "
            "a budget too small is refused with the smallest that works (default: 1/4 of free memory)."
        ),
    ]
    device = Annotated[str, typer.Option(help="cpu or cuda.")]
    device_budget = Annotated[
        Optional[str],
        typer.Option(
            help="Dictionary pages kept on --device, e.g. 8GiB (default: half the free CUDA memory; 0 on the CPU)."
        ),
    ]
    pretrained = Annotated[
        Optional[str],
        typer.Option(
            help="Backbone weights: 'imagenet' (torchvision's, from the torch hub cache under TORCH_HOME, "
            "downloaded there when online) or a local torchvision state dict file."
        ),
    ]
    checkpoint_every = Annotated[Optional[int], typer.Option(help="Override train.checkpoint_every_steps.")]
    max_steps = Annotated[
        Optional[int],
        typer.Option(
            help="Stop after this many steps, checkpointed, as on SIGTERM "
            "(exit 75; --resume goes on): e.g. a job's share of a time limit."
        ),
    ]
    deterministic = Annotated[bool, typer.Option("--deterministic", help="Deterministic torch kernels (CPU: bitwise).")]
    transductive = Annotated[
        bool,
        typer.Option(
            "--transductive",
            help="Also train on the test gallery split (as the published VeRi-776 run did); every result then says so.",
        ),
    ]
    decode_on_device = Annotated[
        bool,
        typer.Option(
            "--decode-on-device",
            help="Decode the JPEGs in batches on --device (nvJPEG on CUDA) instead of in the DataLoader workers.",
        ),
    ]
    tensorboard = Annotated[
        Optional[Path],
        typer.Option(
            help="Write per-step loss and lr and each epoch's history as TensorBoard scalars into this folder "
            "(needs pip install 'wildreid\\[tensorboard]')."
        ),
    ]
    overrides = Annotated[
        list[str], typer.Option("--set", help="Any config value, e.g. --set loss.delta=0.5 (repeatable).")
    ]
    as_json = Annotated[bool, typer.Option("--json", help="Print one final JSON line.")]
    nproc_per_node = Annotated[
        int,
        typer.Option(
            help="Train with this many processes on this machine (torch.distributed, as torchrun --standalone "
            "--nproc-per-node N -m wildreid train ...): one per GPU with --device cuda. train.batch_size is the "
            "global batch; --memory-budget and --device-budget are per process."
        ),
    ]
    collective_timeout = Annotated[
        float,
        typer.Option(
            help="Seconds a rank waits for the others in a collective before the run stops with an error "
            "naming the rank (a rank that died or hangs)."
        ),
    ]


@app.command()
@friendly
def train(
    shards: TrainOption.shards,
    store: TrainOption.store,
    config: TrainOption.config = None,
    epochs: TrainOption.epochs = None,
    resume: TrainOption.resume = False,
    memory_budget: TrainOption.memory_budget = None,
    device: TrainOption.device = "cpu",
    device_budget: TrainOption.device_budget = None,
    pretrained: TrainOption.pretrained = None,
    checkpoint_every: TrainOption.checkpoint_every = None,
    max_steps: TrainOption.max_steps = None,
    deterministic: TrainOption.deterministic = False,
    transductive: TrainOption.transductive = False,
    decode_on_device: TrainOption.decode_on_device = False,
    tensorboard: TrainOption.tensorboard = None,
    overrides: TrainOption.overrides = [],  # noqa: B006 - typer copies it; the signature is its declaration
    as_json: TrainOption.as_json = False,
    nproc_per_node: TrainOption.nproc_per_node = 1,
    collective_timeout: TrainOption.collective_timeout = 600.0,
):
    """Train SSML-FD on the unlabelled train split: dictionary, DPLM positives and DTL, crash-safe."""
    # the API's keyword arguments are these options, named alike
    options = {name: value for name, value in locals().items() if name not in ("as_json", "nproc_per_node")}
    if nproc_per_node < 1:
        raise ConfigError(f"expected --nproc-per-node >= 1, found {nproc_per_node}")
    if nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        # each rank runs this very command line without --nproc-per-node
        raise typer.Exit(api.launch_ranks(nproc_per_node, options, sys.argv[1:], _echo))
    with RichProgress() as bar, GracefulStop() as stop:
        report = api.train(**options, progress=bar, should_stop=stop, log=_say)
    if report is not None:  # rank 0 (or the only process) reports
        _print_training(report, store)
        if as_json:
            print(json.dumps(report, sort_keys=True))


def _print_training(report: dict, store: Path) -> None:
    table = Table(
        title=f"training run in {store}"
        + (" (TRANSDUCTIVE: trained on the test gallery too)" if report["transductive"] else "")
    )
    # precision and recall need every vehicle id; the label-free columns (wildreid.label_free) do not
    scored = ("precision", "recall") if any(h.get("precision") is not None for h in report["history"]) else ()
    for col in ("epoch", "loss", *scored, "positives/img", "with others", "groups", "images/s", "peak RSS"):
        table.add_column(col, justify="right")
    for h in report["history"]:
        table.add_row(
            str(h["epoch"]) + (" (warm-up)" if h["warmup"] else ""),
            _fmt(h["loss"]),
            *(_fmt(h[key]) for key in scored),
            _fmt(h["mean_positives"]),
            _fmt(h.get("share_with_others")),
            "-" if h.get("groups") is None else f"{h['groups']:,}",
            f"{h['images_per_s']:.0f}",
            format_bytes(h["peak_rss_bytes"]),
        )
    out.print(table)
    out.print(f"model: {report['checkpoint']}", highlight=False)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


@app.command()
@friendly
def mine(
    store: Path = typer.Option(..., help="Feature store (Zarr group with features (N, D))."),
    k: int = typer.Option(101, help="k-NN graph width K, self included (>= adjacency + 1)."),
    threshold: float = typer.Option(0.6, help="DPLM similarity threshold t."),
    min_candidates: int = typer.Option(10, help="DPLM minimum candidates l."),
    adjacency: int = typer.Option(100, help="DPLM adjacency size a."),
    order: str = typer.Option("similarity", help="DPLM candidate order: similarity or published (SSML-FD code)."),
    camera_penalty: float = typer.Option(
        0.0,
        help="Camera-aware candidate lists: rank each row's own-camera neighbours by similarity minus this "
        "(needs every camera id; 0: off; see docs/camera.md).",
    ),
    memory_budget: Optional[str] = typer.Option(
        None,
        help="What mining may allocate above the idle process, e.g. 512MiB (default: 1/4 of free memory).",
    ),
    workers: int = typer.Option(2, help="Concurrent block tasks (local threads)."),
    scheduler: Optional[str] = typer.Option(None, help="dask.distributed scheduler address (default: local threads)."),
    as_json: bool = typer.Option(False, "--json", help="Print one final JSON line."),
):
    """Mine DPLM positives out of core: blockwise exact k-NN graph, then the rules (resumable)."""
    with RichProgress() as progress, GracefulStop() as stop:
        report = api.mine(
            store,
            k=k,
            threshold=threshold,
            min_candidates=min_candidates,
            adjacency=adjacency,
            order=order,
            camera_penalty=camera_penalty,
            memory_budget=memory_budget,
            workers=workers,
            scheduler=scheduler,
            progress=progress,
            should_stop=stop,
            log=_say,
        )
    table = Table(title=f"DPLM positives of {store}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("n", "dim", "mean_positives", "precision", "recall", "pending_pairs", "knn_s", "rules_s", "total_s"):
        value = report.get(key)
        table.add_row(key, "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value))
    table.add_row("peak RSS", format_bytes(report["peak_rss_bytes"]))
    table.add_row("memory budget", format_bytes(report["memory_budget_bytes"]))
    out.print(table)
    if as_json:
        print(json.dumps(report, sort_keys=True))


@app.command("eval")
@friendly
def evaluate(
    query: Optional[Path] = typer.Option(None, help="Query feature group (Zarr: features, ids, camids)."),
    gallery: Optional[Path] = typer.Option(None, help="Gallery feature group (with --query)."),
    shards: Optional[Path] = typer.Option(None, help="Shard folder to extract features from (with --checkpoint)."),
    checkpoint: Optional[Path] = typer.Option(None, help="model.pt (or a checkpoint folder) written by training."),
    split: str = typer.Option("small", help="small, medium, large, all (the three) or veri776 (with --checkpoint)."),
    features_dir: Optional[Path] = typer.Option(None, help="Folder for extracted groups (default: CKPT_DIR/features)."),
    rerank: bool = typer.Option(False, help="k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3)."),
    camera_norm: bool = typer.Option(
        False,
        help="Subtract each camera's mean feature (over its query and gallery "
        "rows) before ranking; not the standard protocol.",
    ),
    memory_budget: Optional[str] = typer.Option(
        None,
        help="Memory of this whole process (USS), e.g. 2GiB: evaluation works in what the interpreter, libraries "
        "and model leave of it (default: 1/4 of free RAM).",
    ),
    device: str = typer.Option("cpu", help="cpu or cuda (feature extraction and distances)."),
    output: Optional[Path] = typer.Option(None, help="Results JSON (with --checkpoint: CKPT_DIR/eval-SPLIT.json)."),
    feature: Optional[str] = typer.Option(
        None, help="bnneck or pool5 (with --checkpoint; default: the model's model.eval_feature)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one final JSON line."),
):
    """mAP, mINP and CMC of query against gallery features, exact and blockwise (no Q x G matrix)."""
    with RichProgress() as progress, GracefulStop() as stop:
        results = api.evaluate(
            query=query,
            gallery=gallery,
            shards=shards,
            checkpoint=checkpoint,
            split=split,
            features_dir=features_dir,
            rerank=rerank,
            camera_norm=camera_norm,
            memory_budget=memory_budget,
            device=device,
            output=output,
            feature=feature,
            progress=progress,
            should_stop=stop,
            log=_say,
        )
    by_split = {query.name: results} if query is not None else results
    _print_evaluation(by_split, rerank=rerank, camera_norm=camera_norm)
    if as_json:
        print(json.dumps(results, sort_keys=True))


def _print_evaluation(results: dict[str, dict], *, rerank: bool, camera_norm: bool) -> None:
    transductive = any(r.get("transductive") for r in results.values())
    table = Table(
        title=f"evaluation in %{', re-ranked' if rerank else ''}"
        f"{', camera-normalised' if camera_norm else ''} (skipped: queries without a true match)"
        + (" of a TRANSDUCTIVE model (trained on the test gallery too)" if transductive else ""),
        box=box.SIMPLE,
        pad_edge=False,
        collapse_padding=True,
    )
    for col in ("split", "mAP", "mINP", "R-1", "R-5", "R-10", "R-20", "valid", "skipped", "gallery"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, r in results.items():
        table.add_row(
            name,
            *(f"{100 * r[k]:.2f}" for k in ("mAP", "mINP", "rank1", "rank5", "rank10", "rank20")),
            str(r["valid_queries"]),
            str(r["skipped_queries"]),
            str(r["gallery"]),
        )
    out.print(table)


@app.command("export")
@friendly
def export_command(
    checkpoint: Path = typer.Argument(..., help="model.pt (or a checkpoint folder) written by 'wildreid train'."),
    fmt: str = typer.Option(..., "--format", help="onnx (run with onnxruntime) or torchscript (torch.jit.load)."),
    output: Path = typer.Option(..., help="The file to write (atomically, only once the check passes)."),
    shards: Optional[Path] = typer.Option(
        None,
        help="Shard folder whose images the export is checked on against PyTorch (default: the shards the model "
        "was trained on, as model.pt records them).",
    ),
    split: Optional[str] = typer.Option(None, help="Split of the check images (default: train, else a query split)."),
    feature: Optional[str] = typer.Option(None, help="bnneck or pool5 (default: the model's model.eval_feature)."),
    tolerance: Optional[float] = typer.Option(
        None, help="Largest absolute feature difference accepted (default 1e-4: float32 on the CPU)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Export and check, but write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print one final JSON line."),
):
    """Export the embedding network (uint8 images in, L2-normalised features out), checked against PyTorch."""
    r = api.export(
        checkpoint,
        format=fmt,
        output=output,
        shards=shards,
        split=split,
        feature=feature,
        tolerance=tolerance,
        dry_run=dry_run,
    )
    out.print(
        f"checked on {r['check_images']} images of split {r['check_split']} (batches of "
        f"{', '.join(map(str, r['checked_batches']))}): largest |{fmt} - PyTorch| = {r['max_abs_diff']:.3g}, "
        f"tolerance {r['tolerance']:g}",
        highlight=False,
        soft_wrap=True,
    )
    what = f"{r['input']} -> {r['feature']} features (N, {r['output_dim']}), L2-normalised"
    verb = "would write" if dry_run else "wrote"
    out.print(f"{verb} {output} ({format_bytes(r['bytes'])}): {what}", highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps(r, sort_keys=True))


@app.command()
@friendly
def visualize(
    shards: Path = typer.Option(..., help="Shard folder the feature groups were extracted from."),
    query: Path = typer.Option(..., help="Query feature group."),
    gallery: Path = typer.Option(..., help="Gallery feature group."),
    query_split: str = typer.Option(..., help="Shard split of the query group, e.g. query-small."),
    gallery_split: str = typer.Option(..., help="Shard split of the gallery group, e.g. gallery-small."),
    out_png: Path = typer.Option(..., "--out", help="PNG of the ranked lists (one row per query)."),
    queries: Optional[str] = typer.Option(None, help="Query rows to draw, e.g. 0,5,9 (default: see --num)."),
    num: int = typer.Option(6, help="Without --queries: the first NUM queries that have a true match."),
    k: int = typer.Option(10, help="Ranked gallery images per query (same-camera junk shown extra, greyed)."),
    rerank: bool = typer.Option(False, help="Rank by k-reciprocal re-ranked distances."),
    memory_budget: Optional[str] = typer.Option(None, help="Working-set bound, e.g. 1GiB."),
    device: str = typer.Option("cpu", help="cpu or cuda (distances)."),
    history: Optional[Path] = typer.Option(None, help="history.jsonl of a training run: also draw training curves."),
    curves: Optional[Path] = typer.Option(None, help="PNG of the training curves (default: OUT-curves.png)."),
):
    """Draw ranked lists of chosen queries (green: same vehicle, red: another), and training curves."""
    drawn = api.visualize(
        shards=shards,
        query=query,
        gallery=gallery,
        query_split=query_split,
        gallery_split=gallery_split,
        out=out_png,
        queries=None if queries is None else _rows(queries),
        num=num,
        k=k,
        rerank=rerank,
        memory_budget=memory_budget,
        device=device,
        history=history,
        curves=curves,
    )
    chosen = ", ".join(map(str, drawn["queries"]))
    out.print(f"ranked lists of queries {chosen}: {drawn['ranked_lists']}", highlight=False, soft_wrap=True)
    if drawn["curves"] is not None:
        out.print(f"training curves ({drawn['epochs']} epochs): {drawn['curves']}", highlight=False)


def _rows(text: str) -> list[int]:
    """Row numbers such as 0,5,9."""
    try:
        return [int(q) for q in text.split(",") if q.strip()]
    except ValueError:
        raise ConfigError(f"expected --queries as row numbers such as 0,5,9, found {text!r}") from None


@app.command()
@friendly
def embed(
    src: Path = typer.Argument(..., help="A shard folder (with --split), an image folder or a list file."),
    checkpoint: Path = typer.Option(..., help="model.pt (or a checkpoint folder) written by training."),
    output: Path = typer.Option(..., help="Feature group to write (Zarr: features, ids, camids, keys)."),
    split: Optional[str] = typer.Option(None, help="Split of a shard folder (or of a list with several)."),
    camera_from: Optional[str] = typer.Option(
        None, help="Cameras of an image folder: level:N (the N-th folder names it) or regex:PATTERN."
    ),
    memory_budget: Optional[str] = typer.Option(
        None, help="Batch and chunk buffer beyond the model, e.g. 1GiB (default: 1/4 of free memory)."
    ),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    chunk_rows: Optional[int] = typer.Option(None, help="Rows per Zarr chunk of a new group (default: 16 MiB)."),
    feature: Optional[str] = typer.Option(None, help="bnneck or pool5 (default: the model's model.eval_feature)."),
    as_json: bool = typer.Option(False, "--json", help="Print one final JSON line."),
):
    """Embed every image of SRC into a feature group that 'wildreid search' can query (resumable)."""
    with RichProgress() as progress, GracefulStop() as stop:
        report = api.embed(
            src,
            checkpoint=checkpoint,
            output=output,
            split=split,
            camera_from=camera_from,
            memory_budget=memory_budget,
            device=device,
            chunk_rows=chunk_rows,
            feature=feature,
            progress=progress,
            should_stop=stop,
            log=_say,
        )
    out.print(
        f"embedded {report['rows']:,} images of {src} into {output} ({report['dim']}-d, batch {report['batch']}, "
        f"{report['images_per_s']:.0f} images/s; {report['rows_found_done']:,} rows were already done)",
        highlight=False,
        soft_wrap=True,
    )
    if as_json:
        print(json.dumps(report, sort_keys=True))


@app.command("search")
@friendly
def search_command(
    gallery: Path = typer.Option(..., help="Gallery feature group (made by 'wildreid embed')."),
    query: Path = typer.Option(..., help="An image file, or a feature group (each row is a query)."),
    checkpoint: Optional[Path] = typer.Option(None, help="The model.pt that embedded the gallery (image queries)."),
    top_k: int = typer.Option(20, "--top-k", help="Gallery images per query."),
    index: str = typer.Option("exact", help="exact (blockwise, streams the gallery) or ivf (approximate, in memory)."),
    nlist: Optional[int] = typer.Option(None, help="IVF lists (default: sqrt of the gallery rows)."),
    nprobe: Optional[int] = typer.Option(None, help="IVF lists visited per query (default: 16, at most --nlist)."),
    memory_budget: Optional[str] = typer.Option(None, help="Working-set bound, e.g. 1GiB (default: 1/4 of free RAM)."),
    device: str = typer.Option("cpu", help="cpu or cuda (embedding an image query)."),
    picture: Optional[Path] = typer.Option(None, help="PNG of the first 8 queries and their ranked gallery images."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line per query (no table)."),
):
    """Ranked gallery images of a query image or of every row of a query group, by cosine similarity."""
    with RichProgress() as progress:
        results = api.search(
            gallery=gallery,
            query=query,
            checkpoint=checkpoint,
            top_k=top_k,
            index=index,
            nlist=nlist,
            nprobe=nprobe,
            memory_budget=memory_budget,
            device=device,
            picture=picture,
            progress=progress,
            log=_say,
        )
    if as_json:
        for entry in results:
            print(json.dumps(entry))
        return
    for entry in results[:10]:
        table = Table(title=f"query {entry['query']}", title_justify="left")
        for col in ("rank", "similarity", "gallery key"):
            table.add_column(col, justify="left" if col == "gallery key" else "right")
        for r in entry["results"]:
            table.add_row(str(r["rank"]), f"{r['similarity']:.4f}", r["key"])
        out.print(table)
    if len(results) > 10:
        out.print(f"... and {len(results) - 10:,} more queries (use --json for all)")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
