"""The ``wildreid`` command line: each command parses options and calls one library function."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from wildreid.errors import WildreidError
from wildreid.units import format_bytes, parse_bytes, parse_size

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
        except WildreidError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: re-run the same command to resume")
            raise typer.Exit(130) from None

    return wrapper


class RichProgress:
    """A progress bar per phase, fed by the library's ``progress(phase, advance, total)`` calls."""

    def __init__(self):
        self.bar = Progress(
            TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=console, transient=False, disable=not console.is_terminal and not _force_progress(),
        )  # fmt: skip
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
    import os

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
    from wildreid.shards.synth import write_synthetic

    total = (train_vehicles + test_vehicles) * images_per_vehicle
    with RichProgress() as progress:
        summary = write_synthetic(
            out_dir, train_vehicles=train_vehicles, test_vehicles=test_vehicles,
            images_per_vehicle=images_per_vehicle, cameras=cameras, image_size=parse_size(image_size),
            seed=seed, workers=workers, progress=lambda n: progress("drawing images", n, total),
        )  # fmt: skip
    out.print(f"wrote {total} images to {out_dir}")
    if preview is not None:
        from wildreid.shards.preview import identity_grid

        out.print(f"preview: {identity_grid(out_dir, preview)}")
    out.print(json.dumps(summary, sort_keys=True), highlight=False, soft_wrap=True)


@app.command()
@friendly
def shard(
    src: Path = typer.Argument(..., help="Dataset folder (or, with --verify, the shard folder)."),
    out_dir: Optional[Path] = typer.Argument(None, metavar="OUT", help="Folder for the shards and manifest.json."),
    layout: str = typer.Option("auto", help="auto, veriwild, veri776 or flat."),
    max_samples: int = typer.Option(10_000, help="At most this many samples per shard."),
    max_bytes: str = typer.Option("1GiB", help="At most this many bytes per shard (e.g. 256MiB)."),
    workers: int = typer.Option(1, help="Processes scanning images and writing shards."),
    strict: bool = typer.Option(False, help="Fail on the first bad image instead of skipping and listing it."),
    verify: bool = typer.Option(False, help="Re-check every shard of SRC against its manifest and exit."),
):
    """Pack a dataset into WebDataset tar shards (deterministic, resumable)."""
    from wildreid.errors import ShardError
    from wildreid.shards import LAYOUTS, pack_dataset, read_dataset, verify_shards

    if verify:
        with RichProgress() as progress:
            problems = verify_shards(src, progress=progress)
        for problem in problems:
            console.print(f"[red]bad shard:[/] {problem}", highlight=False)
        if problems:
            raise ShardError(f"{len(problems)} shard(s) in {src} do not match the manifest; re-run 'wildreid shard'")
        out.print(f"all shards in {src} match the manifest")
        return
    if out_dir is None:
        raise typer.BadParameter("OUT is required unless --verify is given")
    shard_bytes = parse_bytes(max_bytes)
    index = read_dataset(src, layout)
    how = "auto-detected" if layout == "auto" else "as asked"
    console.print(f"layout: {LAYOUTS[index.layout].description} ({how}), {index.count()} images listed")
    with RichProgress() as progress:
        manifest = pack_dataset(
            index, out_dir, max_samples=max_samples, max_bytes=shard_bytes,
            workers=workers, strict=strict, progress=progress,
        )  # fmt: skip
    _print_manifest(manifest)


def _print_manifest(manifest: dict) -> None:
    table = Table(title=f"shards of {manifest['source']} ({manifest['layout']})")
    for col in ("split", "samples", "shards", "size", "vehicles", "cameras"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, split in manifest["splits"].items():
        table.add_row(name, str(split["num_samples"]), str(len(split["shards"])), format_bytes(split["num_bytes"]),
                      str(split["num_vehicles"]), str(split["num_cameras"]))  # fmt: skip
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
    from wildreid.shards import load_manifest
    from wildreid.shards.reader import read_back

    manifest = load_manifest(shards)
    rows = [read_back(shards, split, image_size=parse_size(image_size), workers=workers) for split in manifest["splits"]]
    table = Table(title=f"read back from {shards}")
    for col in ("split", "samples", "vehicles", "cameras", "images/s"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for r in rows:
        table.add_row(r["split"], str(r["samples"]), str(r["vehicles"]), str(r["cameras"]), f"{r['images_per_s']:.0f}")
    out.print(table)
    if as_json:
        print(json.dumps({r["split"]: r for r in rows}, sort_keys=True))


@app.command()
@friendly
def mine(
    store: Path = typer.Option(..., help="Feature store (Zarr group with features (N, D))."),
    k: int = typer.Option(101, help="k-NN graph width K, self included (>= adjacency + 1)."),
    threshold: float = typer.Option(0.6, help="DPLM similarity threshold t."),
    min_candidates: int = typer.Option(10, help="DPLM minimum candidates l."),
    adjacency: int = typer.Option(100, help="DPLM adjacency size a."),
    memory_budget: Optional[str] = typer.Option(None, help="Working-set bound, e.g. 512MiB (default: 1/4 of free memory)."),
    workers: int = typer.Option(2, help="Concurrent block tasks (local threads)."),
    scheduler: Optional[str] = typer.Option(None, help="dask.distributed scheduler address (default: local threads)."),
    as_json: bool = typer.Option(False, "--json", help="Print one final JSON line."),
):
    """Mine DPLM positives out of core: blockwise exact k-NN graph, then the rules (resumable)."""
    from wildreid.mining import MineParams, mine as run_mine

    params = MineParams(k=k, threshold=threshold, min_candidates=min_candidates, adjacency=adjacency)
    budget = parse_bytes(memory_budget) if memory_budget else None
    with RichProgress() as progress:
        report = run_mine(str(store), params, memory_budget=budget, workers=workers, scheduler=scheduler,
                          progress=progress)  # fmt: skip
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


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
