"""Where a demo-config training run spends its time: cProfile of one run, grouped into phases.

    python scripts/profile_train.py [--epochs 6] [--workers 0] [--out /tmp/wildreid-profile]

Makes the demo's data (200 training vehicles, 8 images each, ``wildreid synth``), trains
``configs/demo.yaml`` for a few epochs in this process under cProfile (``train.workers=0``
by default, so that reading and decoding are profiled too) and prints one markdown table:
the cumulative seconds of each phase and its share of the run. Phases nest (a rebuild's
forward passes count under "forward" as well), so the shares need not add up to 100 %;
what is left is Python and library overhead between them.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# phase -> (file suffix, function name) whose cumulative time it is
PHASES = {
    "dictionary steps (loss, backward, SGD, momentum update)": ("pipeline/training.py", "dictionary_step"),
    "forward passes (training steps and rebuilds)": ("pipeline/training.py", "_forward"),
    "  of which backward passes": ("torch/_tensor.py", "backward"),
    "  of which SGD updates": ("torch/optim/sgd.py", "step"),
    "dictionary rebuilds (train.refresh=published)": ("pipeline/training.py", "rebuild"),
    "eval-mode extraction (train.refresh=eval, --epochs 0)": ("pipeline/extract.py", "extract_split"),
    "DPLM mining": ("pipeline/mining.py", "mine"),
    "checkpoints (copy, sha256, fsync)": ("pipeline/checkpoint.py", "save_checkpoint"),
    "augmentation": ("pipeline/transforms.py", "__call__"),
    "reading and decoding shards": ("shards/reader.py", "__iter__"),
}


def _cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    return sum(row[3] for (file, _line, func), row in stats.stats.items() if file.endswith(suffix) and func == name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("/tmp/wildreid-profile"))
    a = p.parse_args(argv)
    if a.epochs < 1 or a.workers < 0:
        p.error("expected --epochs >= 1 and --workers >= 0")

    from wildreid.config import load_config
    from wildreid.shards import pack_dataset, read_dataset
    from wildreid.shards.synth import write_synthetic
    from wildreid.training import TrainOptions, train

    data, shards, store = a.out / "data", a.out / "shards", a.out / "store"
    if not (shards / "manifest.json").is_file():
        shutil.rmtree(a.out, ignore_errors=True)
        write_synthetic(data, train_vehicles=200, test_vehicles=60, images_per_vehicle=8, seed=0)
        pack_dataset(read_dataset(data), shards, max_samples=400)
    shutil.rmtree(store, ignore_errors=True)
    config = load_config(ROOT / "configs" / "demo.yaml", [f"train.epochs={a.epochs}", f"train.workers={a.workers}"])
    profile = cProfile.Profile()
    began = time.perf_counter()
    profile.enable()
    report = train(shards, store, config, TrainOptions(memory_budget=1 << 30))
    profile.disable()
    total = time.perf_counter() - began
    stats = pstats.Stats(profile)
    images = sum(h["steps"] for h in report["history"]) * config.train.batch_size
    print(
        f"{a.epochs} epochs of configs/demo.yaml, 1,600 training images, train.workers={a.workers}: "
        f"{total:.1f} s, {images / total:.0f} training images/s overall\n"
    )
    print("| phase | seconds | share |\n|---|---:|---:|")
    for phase, (suffix, name) in PHASES.items():
        seconds = _cumulative(stats, suffix, name)
        print(f"| {phase} | {seconds:.1f} | {100 * seconds / total:.0f} % |")
    print(f"| the whole run | {total:.1f} | 100 % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
