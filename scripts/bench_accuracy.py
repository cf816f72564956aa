"""Accuracy study: mAP and rank-1 of training settings over several seeds, with paired bootstrap intervals.

A setting is a list of config overrides (``SETTINGS``: name -> ``section.key=value`` list, applied after
``--config`` and ``--set``). Each (scenario, setting, seed) trains with ``wildreid train`` (``train.seed`` =
the seed; the data set, and so the query set, is the same for every seed), evaluates with ``wildreid eval
--split large --json`` and scores every query from the extracted groups (``per_query_metrics``: AP and rank-1
hit of each query; their means are checked against the command's mAP and rank-1). Scenarios:

* ``scratch``: random initial weights (``configs/demo.yaml``: resnet18, 64x32, 20 epochs);
* ``adapt``: a backbone first trained WITH labels (cross-entropy over the vehicle ids, ``pretrain``) on a
  synthetic set of another generator seed (``wildreid synth`` draws its body models, cameras and vehicles
  from the seed, so the domains differ), a stand-in for ImageNet weights; then adapted WITHOUT labels by
  SSML-FD to the study's set (``model.pretrained=FILE``). Its "untrained" is that backbone used as is
  (``train.epochs=0`` with the same file). One backbone per seed (``--backbones per-seed``, the default) or
  one shared by every seed (``--backbones shared``, said in the output).

Statistics (pure functions, tested in tests/test_bench_accuracy.py): per setting the mean mAP and rank-1 over
seeds; Δ against "untrained" and against "published" of the same scenario, paired by seed and query, with a
two-level percentile bootstrap (``--resamples`` replicates, numpy Generator seeded by ``--bootstrap-seed``):
each replicate draws the seeds with replacement and, independently, the queries with replacement, and both
settings of a pair are scored on the very same draw. The query set is one sample shared by all seeds (a
crossed design), so one query draw serves every seed of a replicate.

Runs are resumable: each finished (scenario, setting, seed) writes ``OUT/results/SCENARIO/SETTING/seed-S.json``
and a rerun skips it (a result of other overrides or data is redone); an interrupted training resumes with
``--resume``. Run folders are deleted once their result is written (``--keep-runs`` keeps them). The end
prints a markdown table (paste into README.md) and writes ``OUT/summary.json``. ``--dry-run`` lists the runs
left to do (count the trained ones to size a study); ``--quick`` is a smoke run of the whole pipeline.

    python scripts/bench_accuracy.py [--out /tmp/wildreid-bench-accuracy] [--seeds 5] [--jobs 1]
        [--settings untrained,defaults,published,...] [--scenarios scratch,adapt] [--quick] [--dry-run]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
# name -> overrides. "untrained" and "published" are the baselines of the Δ columns.
# The camera-aware pieces are on in the configs since the study of docs/camera.md; the settings that test
# something else against the published method keep them off (train.mining=batch needs them off).
NO_CAMERA = ["camera.aware=false"]
_PIECES_OFF = ["camera.normalise=false", "camera.own_negatives=0", "camera.inter_weight=0", "camera.intra_penalty=0"]
SETTINGS: dict[str, list[str]] = {
    "untrained": ["train.epochs=0"],
    "defaults": [],
    "published": [
        "train.refresh=published",
        "mining.order=published",
        "dictionary.dtype=float32",
        "model.eval_feature=pool5",
        "train.mining=batch",
        *NO_CAMERA,
    ],
    "refresh-eval": ["train.refresh=eval"],
    "refresh-published": ["train.refresh=published"],
    "order-published": ["mining.order=published"],
    "order-similarity": ["mining.order=similarity"],
    "dtype-float32": ["dictionary.dtype=float32"],
    "dtype-float16": ["dictionary.dtype=float16"],
    "feature-pool5": ["model.eval_feature=pool5"],
    "feature-bnneck": ["model.eval_feature=bnneck"],
    "mining-batch": ["train.mining=batch", *NO_CAMERA],
    "mining-epoch": ["train.mining=epoch"],
    # the ceiling: ground-truth positives (the vehicle ids) through the same DTL
    "oracle": ["mining.oracle=true", *NO_CAMERA],
    # camera-aware pieces (the camera: section), each alone, then all together, and the camera-agnostic method
    "camera-normalise": ["camera.aware=true", *_PIECES_OFF, "camera.normalise=true"],
    "camera-negatives": ["camera.aware=true", *_PIECES_OFF, "camera.own_negatives=0.5"],
    "camera-inter": ["camera.aware=true", *_PIECES_OFF, "camera.inter_weight=0.5"],
    "camera-candidates": ["camera.aware=true", *_PIECES_OFF, "camera.intra_penalty=0.25"],
    "camera-all": [
        "camera.aware=true",
        "camera.normalise=true",
        "camera.own_negatives=0.5",
        "camera.inter_weight=0.5",
        "camera.intra_penalty=0.25",
    ],
    "camera-off": NO_CAMERA,
}
DEFAULT_SETTINGS = "untrained,defaults,published,refresh-eval,order-published"
DEFAULT_ADAPT_SETTINGS = "untrained,defaults,published"
SCENARIOS = ("scratch", "adapt")
BASELINES = ("untrained", "published")
# (per-query key, metric): the standard protocol, then with camera normalisation (wildreid eval --camera-norm)
METRICS = (("ap", "mAP"), ("hit1", "rank1"), ("ap_camnorm", "mAP_camnorm"), ("hit1_camnorm", "rank1_camnorm"))
SPLIT = "large"  # every test vehicle, one query each
PRETRAIN_SEED_OFFSET = 1000  # the pretraining set's generator seed: the study's + this
# --quick: a smoke run of the whole pipeline in a few minutes
QUICK = {
    "seeds": 2,
    "train_vehicles": 30,
    "test_vehicles": 40,
    "images_per_vehicle": 4,
    "pretrain_epochs": 1,
    "overrides": ["train.epochs=3", "train.warmup_epochs=2"],
    "settings": "untrained,defaults",
    "adapt_settings": "untrained,defaults",
}


# --------------------------------------------------------------------------- statistics (pure)


def _paired(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or a.shape != b.shape or 0 in a.shape:
        raise ValueError(f"expected two (seeds, queries) arrays of one non-empty shape, found {a.shape} and {b.shape}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("expected no NaN: drop the queries without a true match first")
    return a - b


def bootstrap_draws(n_seeds: int, n_queries: int, *, resamples: int = 2000, seed: int = 0):
    """(seed counts (R, S), query counts (R, Q)) of ``resamples`` two-level draws with replacement."""
    if n_seeds < 1 or n_queries < 1 or resamples < 1:
        raise ValueError(f"expected seeds, queries and resamples >= 1, found {n_seeds}, {n_queries}, {resamples}")
    rng = np.random.default_rng(seed)
    ws = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=resamples)
    wq = rng.multinomial(n_queries, np.full(n_queries, 1.0 / n_queries), size=resamples)
    return ws, wq


def paired_bootstrap(a, b, *, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Δ = mean(a) - mean(b) of two (seeds, queries) arrays of per-query scores, paired by row (seed) and
    column (query), and its two-level percentile bootstrap interval: each replicate resamples the seeds with
    replacement and the queries with replacement, one query draw for all its seeds and for both settings.

    Returns {"delta", "low", "high", "seeds", "queries"}; identical inputs give [0, 0].
    """
    if not 0 < level < 1:
        raise ValueError(f"expected a level in (0, 1), found {level}")
    d = _paired(a, b)
    ns, nq = d.shape
    ws, wq = bootstrap_draws(ns, nq, resamples=resamples, seed=seed)
    stats = np.einsum("rs,sq,rq->r", ws.astype(np.float64), d, wq.astype(np.float64)) / (ns * nq)
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    delta = float(d.mean())
    return {"delta": delta, "low": min(float(low), delta), "high": max(float(high), delta), "seeds": ns, "queries": nq}


def seed_means(x) -> dict:
    """Mean over seeds of the per-seed means of a (seeds, queries) array, the per-seed means and their sd."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"expected a non-empty (seeds, queries) array, found shape {x.shape}")
    per_seed = x.mean(axis=1)
    return {
        "mean": float(per_seed.mean()),
        "per_seed": [float(v) for v in per_seed],
        "sd": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0,
    }


def _metrics(results: dict[str, dict[int, dict]]) -> list[tuple[str, str]]:
    """(per-query key, metric name) pairs every finished run has: the standard protocol, then camera-normalised."""
    runs = [r for by_seed in results.values() for r in by_seed.values()]
    return [(key, metric) for key, metric in METRICS if runs and all(key in r for r in runs)]


def compare(results: dict[str, dict[int, dict]], *, resamples: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Per setting of one scenario: seeds, mean mAP / rank-1 and Δ against each baseline present.

    ``results``: setting -> seed -> {"ap": [...], "hit1": [...]} over the valid queries (one order for all),
    and with "ap_camnorm" / "hit1_camnorm" the same under camera normalisation (``wildreid eval --camera-norm``).
    Each Δ uses the seeds both settings finished.
    """
    out = {}
    metrics = _metrics(results)
    for name, runs in results.items():
        seeds = sorted(runs)
        row = {"seeds": seeds}
        for key, metric in metrics:
            row[metric] = seed_means([runs[s][key] for s in seeds]) if seeds else None
        for base in BASELINES:
            common = sorted(set(seeds) & set(results.get(base, {})))
            if name == base or base not in results or not common:
                continue
            row[f"vs_{base}"] = {
                metric: paired_bootstrap(
                    [runs[s][key] for s in common],
                    [results[base][s][key] for s in common],
                    resamples=resamples,
                    seed=seed,
                )
                for key, metric in metrics
            }
        out[name] = row
    return out


def compare_pairs(
    results: dict[str, dict[int, dict]], pairs: list[tuple[str, str]], *, resamples: int = 2000, seed: int = 0
) -> dict[str, dict]:
    """Δ of setting a against setting b for each ``(a, b)`` of one scenario, on the seeds both finished."""
    metrics = _metrics(results)
    out = {}
    for a, b in pairs:
        common = sorted(set(results.get(a, {})) & set(results.get(b, {})))
        if not common:
            continue
        out[f"{a} vs {b}"] = {
            metric: paired_bootstrap(
                [results[a][s][key] for s in common],
                [results[b][s][key] for s in common],
                resamples=resamples,
                seed=seed,
            )
            for key, metric in metrics
        }
    return out


def pairs_markdown(table: dict[str, dict[str, dict]]) -> str:
    """scenario -> "a vs b" -> metric -> Δ: one row per pair, Δ in percentage points with 95% CI."""
    lines = [
        "| scenario | pair | seeds | Δ mAP | Δ rank-1 | Δ mAP, camera-normalised | Δ rank-1, camera-normalised |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for scenario, rows in table.items():
        for pair, d in rows.items():
            cells = [_ci(d.get(m)) for m in ("mAP", "rank1", "mAP_camnorm", "rank1_camnorm")]
            lines.append(f"| {scenario} | {pair} | {d['mAP']['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pp(v: float) -> str:
    return f"{100 * v:+.1f}"


def _ci(c: dict | None) -> str:
    return "–" if c is None else f"{_pp(c['delta'])} [{_pp(c['low'])}, {_pp(c['high'])}]"


def markdown(table: dict[str, dict[str, dict]], protocol: str = "") -> str:
    """The summary table: scenario -> setting -> a ``compare`` row; Δ in percentage points with 95% CI.

    ``protocol`` "" is the standard one, "_camnorm" the camera-normalised metrics (rows lacking them are left out).
    """
    m, r1 = f"mAP{protocol}", f"rank1{protocol}"
    head = (
        "| scenario | setting | seeds | mAP (%) | rank-1 (%) | Δ mAP vs untrained | Δ rank-1 vs untrained "
        "| Δ mAP vs published | Δ rank-1 vs published |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for scenario, rows in table.items():
        for name, r in rows.items():
            if not r["seeds"]:
                lines.append(f"| {scenario} | {name} | 0 | – | – | – | – | – | – |")
                continue
            if r.get(m) is None:
                continue
            cells = [_ci(r.get(f"vs_{b}", {}).get(metric)) for b in BASELINES for metric in (m, r1)]
            lines.append(
                f"| {scenario} | {name} | {len(r['seeds'])} | {100 * r[m]['mean']:.1f} "
                f"| {100 * r[r1]['mean']:.1f} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- data and runs


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "wildreid.cli", *args]


def _env(threads: int) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    return env


class Stopped(RuntimeError):
    """A run was stopped by a signal (it resumes on the next invocation) or not started because of one."""


_STOP = threading.Event()
_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.Lock()
_STOP_CODES = (75, 130, 143, -signal.SIGINT, -signal.SIGTERM)  # wildreid's graceful stop, then the hard ones


def _on_signal(signum, frame) -> None:
    """SIGINT / SIGTERM: start nothing new, pass the signal on once to every running child (each in its own
    session, so a terminal's Ctrl-C reaches them only through here: one signal, a graceful stop)."""
    _STOP.set()
    with _CHILDREN_LOCK:
        for proc in _CHILDREN:
            proc.send_signal(signum)


def _run(cmd: list[str], threads: int, what: str) -> str:
    """Run ``cmd``; its stdout, or RuntimeError with the last line of its stderr (Stopped when signalled)."""
    if _STOP.is_set():
        raise Stopped(f"{what} not started: stopping")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(threads), start_new_session=True
    )
    with _CHILDREN_LOCK:
        _CHILDREN.add(proc)
    try:
        out, err = proc.communicate()
    finally:
        with _CHILDREN_LOCK:
            _CHILDREN.discard(proc)
    if proc.returncode in _STOP_CODES:
        _STOP.set()
        raise Stopped(f"{what} stopped (exit {proc.returncode})")
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{what} exited {proc.returncode}: {last[:400]}")
    return out


def prepare_data(out: Path, *, train: int, test: int, images: int, seed: int, threads: int, log) -> Path:
    """``wildreid synth`` then ``wildreid shard`` under ``out`` (reused when complete); the shard folder."""
    tag = f"{train}-{test}-{images}-s{seed}"
    data, shards = out / f"data-{tag}", out / f"shards-{tag}"
    if not (data / "train_test_split" / "train_list.txt").exists():
        began = time.perf_counter()
        shutil.rmtree(data, ignore_errors=True)
        _run(
            _cli(
                "synth",
                str(data),
                "--train-vehicles",
                str(train),
                "--test-vehicles",
                str(test),
                "--images-per-vehicle",
                str(images),
                "--seed",
                str(seed),
                "--workers",
                str(threads),
            ),
            threads,
            "wildreid synth",
        )
        log(f"synth {tag}: {time.perf_counter() - began:.0f} s")
    if not (shards / "manifest.json").exists():
        _run(
            _cli("shard", str(data), str(shards), "--max-samples", "400", "--workers", str(threads)),
            threads,
            "wildreid shard",
        )
    return shards


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_json(path: Path, value) -> None:
    from wildreid.stores import atomic_write

    atomic_write(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def score_groups(features: Path, split: str = SPLIT) -> dict:
    """Per-query AP and rank-1 hit of the extracted query/gallery groups (queries without a match dropped),
    under the standard protocol and camera-normalised (keys with ``_camnorm``)."""
    from wildreid.camera import camera_means, camera_normalise
    from wildreid.distances import grid_distances
    from wildreid.evaluation import per_query_metrics
    from wildreid.stores import FeatureStore

    q, g = FeatureStore.open(features / f"query-{split}"), FeatureStore.open(features / f"gallery-{split}")
    qf, gf = q.read_rows(0, q.count()), g.read_rows(0, g.count())
    q_ids, q_cams, g_ids, g_cams = q.ids(), q.camids(), g.ids(), g.camids()
    ap, hit1 = per_query_metrics(grid_distances(qf, 0, gf, 0), q_ids, q_cams, g_ids, g_cams)
    means = camera_means([(q, q_cams), (g, g_cams)])
    qn, gn = camera_normalise(qf, q_cams, means), camera_normalise(gf, g_cams, means)
    ap_cn, hit1_cn = per_query_metrics(grid_distances(qn, 0, gn, 0), q_ids, q_cams, g_ids, g_cams)
    valid = ~np.isnan(ap)
    return {
        "ap": ap[valid].tolist(),
        "hit1": hit1[valid].tolist(),
        "ap_camnorm": ap_cn[valid].tolist(),
        "hit1_camnorm": hit1_cn[valid].tolist(),
        "queries": [[int(i), int(c)] for i, c in zip(q_ids[valid], q_cams[valid])],
    }


def train_and_score(job: dict, threads: int, keep: bool) -> dict:
    """One (scenario, setting, seed): train (resuming a broken run), evaluate, score each query; the result."""
    run = Path(job["run"])
    for other in run.parent.glob(f"seed-{job['seed']}-*"):  # runs of other overrides or data: never resumed
        if other != run:
            shutil.rmtree(other, ignore_errors=True)
    cmd = _cli(
        "train",
        "--shards",
        job["shards"],
        "--store",
        str(run),
        "--config",
        job["config"],
        "--json",
        "--memory-budget",
        job["budget"],
        *[a for o in job["overrides"] for a in ("--set", o)],
    )
    began = time.perf_counter()
    if run.exists():
        try:
            out = _run([*cmd, "--resume"], threads, "wildreid train --resume")
        except RuntimeError as exc:
            if "exited 7" not in str(exc):  # 7: nothing to resume
                raise
            shutil.rmtree(run)
            out = _run(cmd, threads, "wildreid train")
    else:
        out = _run(cmd, threads, "wildreid train")
    report = json.loads(out.strip().splitlines()[-1])
    if any(o.startswith("model.pretrained=") for o in job["overrides"]) and not report.get("pretrained"):
        raise RuntimeError(f"wildreid train reports no pretrained weights for {run}; expected {job['overrides']}")
    train_s = time.perf_counter() - began
    began = time.perf_counter()
    ckpt = Path(report["checkpoint"])
    out = _run(
        _cli(
            "eval",
            "--shards",
            job["shards"],
            "--checkpoint",
            str(ckpt),
            "--split",
            SPLIT,
            "--json",
            "--memory-budget",
            job["budget"],
        ),
        threads,
        "wildreid eval",
    )
    agg = json.loads(out.strip().splitlines()[-1])[SPLIT]
    out = _run(
        _cli(
            "eval",
            "--shards",
            job["shards"],
            "--checkpoint",
            str(ckpt),
            "--split",
            SPLIT,
            "--json",
            "--camera-norm",
            "--memory-budget",
            job["budget"],
        ),
        threads,
        "wildreid eval --camera-norm",
    )
    agg_cn = json.loads(out.strip().splitlines()[-1])[SPLIT]
    # BLAS rounds a float32 product by its blocking, which follows the thread count: score with the eval's
    with threadpool_limits(limits=threads):
        scores = score_groups(ckpt.parent / "features")
    for key, metric, ref in (
        ("ap", "mAP", agg),
        ("hit1", "rank1", agg),
        ("ap_camnorm", "mAP", agg_cn),
        ("hit1_camnorm", "rank1", agg_cn),
    ):
        if len(scores[key]) != ref["valid_queries"] or abs(np.mean(scores[key]) - ref[metric]) > 1e-9:
            raise RuntimeError(
                f"per-query {key} {np.mean(scores[key]):.6f} over {len(scores[key])} queries does "
                f"not match wildreid eval's {ref[metric]:.6f} over {ref['valid_queries']}"
            )
    history = [
        {k: h.get(k) for k in ("epoch", "loss", "precision", "recall", "mean_positives")}
        for h in report.get("history", [])
    ]
    result = {
        **{k: job[k] for k in ("scenario", "setting", "seed", "overrides", "fingerprint", "config_digest")},
        **scores,
        "mAP": agg["mAP"],
        "rank1": agg["rank1"],
        "mAP_camnorm": agg_cn["mAP"],
        "rank1_camnorm": agg_cn["rank1"],
        "pretrained": report.get("pretrained"),
        "epochs": report.get("epochs"),
        "train_s": train_s,
        "eval_s": time.perf_counter() - began,
        "history": history,
    }
    _write_json(Path(job["result"]), result)
    if not keep:
        shutil.rmtree(run, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- supervised pretraining


def pretrain(
    shards: Path, out_file: Path, *, seed: int, epochs: int, image_size, batch_size: int = 64, lr: float = 0.05
) -> dict:
    """A torchvision resnet18 trained with labels (cross-entropy over the train split's vehicle ids, random
    crop with 4-pixel padding and horizontal flip, SGD with a one-cycle schedule) on ``shards``; its state dict
    (torchvision keys, fc.* included and ignored by ``model.pretrained``) goes to ``out_file``."""
    import torch
    import torch.nn.functional as F
    import torchvision

    from wildreid.shards.reader import ShardDataset
    from wildreid.stores import atomic_write
    from wildreid.transforms import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(seed)
    h, w = (int(v) for v in image_size)
    labels = ShardDataset(shards, "train", seed=seed, chunk=512, decode=False)
    vids = np.unique(np.concatenate([b[2].numpy() for b in labels]))
    lookup = {int(v): i for i, v in enumerate(vids)}
    data = ShardDataset(shards, "train", image_size=(h, w), seed=seed, chunk=batch_size)
    model = torchvision.models.resnet18(weights=None, num_classes=len(vids))
    steps = epochs * -(-len(data) // batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    history, began = [], time.perf_counter()
    for epoch in range(epochs):
        data.set_epoch(epoch)
        model.train()
        total = correct = loss_sum = 0
        for images, _, vid, _ in data:
            x = (images.float() / 255 - mean) / std
            x = F.pad(x, (4, 4, 4, 4), mode="replicate")
            dy, dx = (int(v) for v in torch.randint(0, 9, (2,), generator=gen))
            x = x[:, :, dy : dy + h, dx : dx + w]
            flip = torch.rand(len(x), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            y = torch.tensor([lookup[int(v)] for v in vid])
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss) * len(y)
        history.append({"epoch": epoch, "loss": loss_sum / total, "train_accuracy": correct / total})
    atomic_write(out_file, lambda f: torch.save(model.state_dict(), f))
    return {
        "file": str(out_file),
        "classes": len(vids),
        "epochs": epochs,
        "seed": seed,
        "history": history,
        "seconds": time.perf_counter() - began,
    }


def pretrain_main(argv: list[str]) -> None:
    """``bench_accuracy.py pretrain SHARDS OUT_FILE --seed S --epochs E --height H --width W``: one backbone."""
    p = argparse.ArgumentParser(prog="bench_accuracy.py pretrain")
    p.add_argument("shards", type=Path)
    p.add_argument("out_file", type=Path)
    for name in ("--seed", "--epochs", "--height", "--width"):
        p.add_argument(name, type=int, required=True)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    report = pretrain(a.shards, a.out_file, seed=a.seed, epochs=a.epochs, image_size=(a.height, a.width))
    _write_json(a.out_file.with_suffix(".json"), report)
    print(json.dumps(report, sort_keys=True))


# --------------------------------------------------------------------------- the study


def _names(text: str, known, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown or len(set(names)) != len(names):
        raise SystemExit(f"error: --{what}: expected distinct names among {', '.join(known)}, found {text!r}")
    return names


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/wildreid-bench-accuracy"))
    p.add_argument("--seeds", type=int, default=None, help="training seeds 0..N-1 (default 5; --quick: 2)")
    p.add_argument("--settings", default=None, help=f"scratch settings (default {DEFAULT_SETTINGS})")
    p.add_argument("--adapt-settings", default=None, help=f"adapt settings (default {DEFAULT_ADAPT_SETTINGS})")
    p.add_argument("--scenarios", default="scratch,adapt")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once (threads each: --threads / jobs)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads in all (default: cores)")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override for every run")
    p.add_argument("--train-vehicles", type=int, default=None, help="default 200 (8 images each)")
    p.add_argument("--test-vehicles", type=int, default=None, help=f"default 240: the {SPLIT} split's queries")
    p.add_argument("--images-per-vehicle", type=int, default=None, help="default 8")
    p.add_argument("--data-seed", type=int, default=0, help=f"generator seed (pretraining: +{PRETRAIN_SEED_OFFSET})")
    p.add_argument("--backbones", choices=("per-seed", "shared"), default="per-seed", help="adapt: backbones")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="supervised epochs (default 15)")
    p.add_argument("--pairs", default="", help="extra paired Δ, e.g. defaults:order-published,defaults:refresh-eval")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument("--memory-budget", default="2GiB")
    p.add_argument("--keep-runs", action="store_true", help="keep run folders (checkpoints, model.pt)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run: " + json.dumps(QUICK))
    p.add_argument("--dry-run", action="store_true", help="list the runs to do and exit")
    a = p.parse_args(argv)
    q = a.quick
    full = {
        "seeds": 5,
        "train_vehicles": 200,
        "test_vehicles": 240,
        "images_per_vehicle": 8,
        "pretrain_epochs": 15,
        "settings": DEFAULT_SETTINGS,
        "adapt_settings": DEFAULT_ADAPT_SETTINGS,
    }
    for key, value in full.items():
        if getattr(a, key) is None:
            setattr(a, key, QUICK[key] if q else value)
    for key, least in (
        ("seeds", 1),
        ("jobs", 1),
        ("threads", 1),
        ("train_vehicles", 1),
        ("test_vehicles", 1),
        ("images_per_vehicle", 2),
        ("pretrain_epochs", 1),
        ("resamples", 100),
    ):
        if getattr(a, key) < least:
            p.error(f"--{key.replace('_', '-')}: expected an integer >= {least}, found {getattr(a, key)}")
    if not Path(a.config).is_file():
        p.error(f"--config: {a.config} does not exist; expected a YAML config such as configs/demo.yaml")
    a.scenarios = _names(a.scenarios, SCENARIOS, "scenarios")
    a.settings = {
        "scratch": _names(a.settings, SETTINGS, "settings"),
        "adapt": _names(a.adapt_settings, SETTINGS, "adapt-settings"),
    }
    a.base = (QUICK["overrides"] if q else []) + a.overrides
    return a


def plan(a, shards: Path, backbone_of) -> list[dict]:
    """Every (scenario, setting, seed) job; its config is checked now (an unknown option fails here)."""
    from wildreid.config import config_digest, load_config
    from wildreid.core.errors import ConfigError

    config_sha = _sha256(Path(a.config))
    jobs = []
    for scenario in a.scenarios:
        for seed in range(a.seeds):
            for setting in a.settings[scenario]:
                extra = [f"model.pretrained={json.dumps(str(backbone_of(seed)))}"] if scenario == "adapt" else []
                overrides = [*a.base, *extra, *SETTINGS[setting], f"train.seed={seed}"]
                try:
                    digest = config_digest(load_config(a.config, overrides))
                except ConfigError as exc:
                    raise SystemExit(
                        f"error: setting {setting!r} ({' '.join(SETTINGS[setting]) or 'no overrides'}) "
                        f"is not valid here: {exc}; leave it out with --settings"
                    ) from None
                key = hashlib.sha256(json.dumps([config_sha, overrides, shards.name, SPLIT]).encode()).hexdigest()[:16]
                tail = f"{scenario}/{setting}/seed-{seed}"
                jobs.append(
                    {
                        "scenario": scenario,
                        "setting": setting,
                        "seed": seed,
                        "overrides": overrides,
                        "fingerprint": key,
                        "config_digest": digest,
                        "config": a.config,
                        "shards": str(shards),
                        "budget": a.memory_budget,
                        "run": str(a.out / "runs" / f"{tail}-{key}"),
                        "result": str(a.out / "results" / f"{tail}.json"),
                    }
                )
    return jobs


def _finished(job: dict) -> dict | None:
    path = Path(job["result"])
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    complete = all(key in result for key, _ in METRICS)  # results from before camera normalisation are redone
    return result if result.get("fingerprint") == job["fingerprint"] and complete else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pretrain"]:
        pretrain_main(argv[1:])
        return 0
    a = parse_args(argv)
    began = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()

    def log(msg: str) -> None:
        with lock:
            print(f"[{time.perf_counter() - began:6.0f} s] {msg}", file=sys.stderr, flush=True)

    from wildreid.config import load_config

    image_size = load_config(a.config, a.base).model.image_size
    size = {
        "train": a.train_vehicles,
        "test": a.test_vehicles,
        "images": a.images_per_vehicle,
        "threads": a.threads,
        "log": log,
    }
    pre_dir = a.out / f"backbones-{a.train_vehicles}-{a.images_per_vehicle}-s{a.data_seed + PRETRAIN_SEED_OFFSET}"

    def backbone_of(seed: int) -> Path:
        return pre_dir / f"resnet18-e{a.pretrain_epochs}-seed{0 if a.backbones == 'shared' else seed}.pth"

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_signal)
    if a.dry_run:
        shards = a.out / f"shards-{a.train_vehicles}-{a.test_vehicles}-{a.images_per_vehicle}-s{a.data_seed}"
    else:
        try:
            shards = prepare_data(a.out, seed=a.data_seed, **size)
        except RuntimeError as exc:
            log(f"error: {exc}")
            return 75 if isinstance(exc, Stopped) else 1
        log(f"study data ready: {shards}")
    jobs = plan(a, shards, backbone_of)
    todo = [j for j in jobs if _finished(j) is None]
    backbones = sorted({backbone_of(j["seed"]) for j in todo if j["scenario"] == "adapt"})
    backbones = [b for b in backbones if not b.exists()]
    threads = max(1, a.threads // a.jobs)
    log(
        f"{len(jobs)} runs, {len(jobs) - len(todo)} finished before; {len(todo)} to do and {len(backbones)} "
        f"backbones to pretrain, {a.jobs} at a time x {threads} threads"
    )
    if a.dry_run:
        for j in todo:
            print(f"{j['scenario']}/{j['setting']}/seed-{j['seed']}: {' '.join(j['overrides'])}")
        return 0
    failures: list[str] = []
    if backbones:
        try:
            pre_shards = prepare_data(a.out, seed=a.data_seed + PRETRAIN_SEED_OFFSET, **{**size, "test": 1})
        except RuntimeError as exc:
            log(f"error: {exc}")
            return 75 if isinstance(exc, Stopped) else 1

    def pretrain_one(path: Path) -> None:
        seed = int(path.stem.rsplit("seed", 1)[1])
        t0 = time.perf_counter()
        try:
            _run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "pretrain",
                    str(pre_shards),
                    str(path),
                    "--seed",
                    str(seed),
                    "--epochs",
                    str(a.pretrain_epochs),
                    "--height",
                    str(image_size[0]),
                    "--width",
                    str(image_size[1]),
                ],
                threads,
                "pretraining",
            )
            acc = json.loads(path.with_suffix(".json").read_text())["history"][-1]["train_accuracy"]
            log(f"backbone {path.name}: {time.perf_counter() - t0:.0f} s, final train accuracy {acc:.3f}")
        except Stopped as exc:
            log(f"{path.name}: {exc}")
        except RuntimeError as exc:
            failures.append(f"{path.name}: {exc}")
            log(f"error: {path.name}: {exc}")

    def run_one(job: dict) -> None:
        name = f"{job['scenario']}/{job['setting']}/seed-{job['seed']}"
        if _STOP.is_set():
            return
        if job["scenario"] == "adapt" and not backbone_of(job["seed"]).exists():
            failures.append(f"{name}: no pretrained backbone")
            return
        try:
            r = train_and_score(job, threads, a.keep_runs)
            log(
                f"{name}: mAP {r['mAP']:.4f}, rank-1 {r['rank1']:.4f}, train {r['train_s']:.0f} s, "
                f"eval {r['eval_s']:.0f} s"
            )
        except Stopped as exc:
            log(f"{name}: {exc}")
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            failures.append(f"{name}: {exc}")
            log(f"error: {name}: {exc}")

    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(pretrain_one, backbones))
        list(pool.map(run_one, sorted(todo, key=lambda j: (j["scenario"] == "adapt", j["seed"]))))
    pre = sorted({backbone_of(j["seed"]).with_suffix(".json") for j in jobs if j["scenario"] == "adapt"})
    return report(a, jobs, failures, began, log, [p for p in pre if p.exists()])


def report(a, jobs: list[dict], failures: list[str], began: float, log, pre: list[Path]) -> int:
    """Collect every finished result, compute the statistics, write OUT/summary.json, print the table."""
    results: dict[str, dict[str, dict[int, dict]]] = {}
    queries = None
    for j in jobs:
        r = _finished(j)
        results.setdefault(j["scenario"], {}).setdefault(j["setting"], {})
        if r is None:
            continue
        if queries is None:
            queries = r["queries"]
        elif r["queries"] != queries:
            raise SystemExit(f"error: {j['result']} scored another query set; delete it and rerun")
        results[j["scenario"]][j["setting"]][j["seed"]] = r
    table = {s: compare(rows, resamples=a.resamples, seed=a.bootstrap_seed) for s, rows in results.items()}
    wanted = [tuple(p.split(":", 1)) for p in a.pairs.split(",") if ":" in p]
    pairs = {
        s: compare_pairs(rows, wanted, resamples=a.resamples, seed=a.bootstrap_seed) for s, rows in results.items()
    }
    pairs = {s: rows for s, rows in pairs.items() if rows}
    times = {
        s: {n: float(np.mean([r["train_s"] for r in runs.values()])) if runs else None for n, runs in rows.items()}
        for s, rows in results.items()
    }
    wall = time.perf_counter() - began
    pretraining = [json.loads(p.read_text()) for p in pre]
    run_s = sum(
        r["train_s"] + r["eval_s"] for rows in results.values() for runs in rows.values() for r in runs.values()
    ) + sum(p["seconds"] for p in pretraining)
    summary = {
        "bench": "accuracy",
        "config": a.config,
        "overrides": a.base,
        "split": SPLIT,
        "queries": len(queries or []),
        "data": {
            "train_vehicles": a.train_vehicles,
            "test_vehicles": a.test_vehicles,
            "images_per_vehicle": a.images_per_vehicle,
            "seed": a.data_seed,
        },
        "seeds": a.seeds,
        "settings": {n: SETTINGS[n] for s in a.scenarios for n in a.settings[s]},
        "backbones": a.backbones,
        "pretrain_epochs": a.pretrain_epochs,
        "resamples": a.resamples,
        "bootstrap_seed": a.bootstrap_seed,
        "table": table,
        "pairs": pairs,
        "mean_train_s": times,
        "pretraining": pretraining,
        "failures": failures,
        "wall_s": wall,
        "runs_s": run_s,
        "jobs": a.jobs,
        "threads": a.threads,
        "quick": a.quick,
    }
    _write_json(a.out / "summary.json", summary)
    print("Standard protocol:\n" + markdown(table))
    if any(r.get("mAP_camnorm") for rows in table.values() for r in rows.values()):
        print("\nCamera-normalised (wildreid eval --camera-norm):\n" + markdown(table, "_camnorm"))
    if pairs:
        print("\nPairs:\n" + pairs_markdown(pairs))
    adapt = ""
    if "adapt" in a.scenarios:
        shared = "one backbone shared by all seeds" if a.backbones == "shared" else "one backbone per seed"
        adapt = (
            f" adapt: supervised resnet18 on generator seed {a.data_seed + PRETRAIN_SEED_OFFSET}, "
            f"{a.pretrain_epochs} epochs, {shared}."
        )
    print(
        f"\n{len(queries or [])} queries ({SPLIT} split); Δ in percentage points, paired two-level bootstrap "
        f"95% CI over seeds and queries ({a.resamples} resamples).{adapt} Total wall time {wall:.0f} s "
        f"({a.jobs} jobs x {max(1, a.threads // a.jobs)} threads); the runs' own times, earlier invocations "
        f"included: {run_s:.0f} s. Summary: {a.out / 'summary.json'}"
    )
    for f in failures:
        log(f"failed: {f}")
    if _STOP.is_set():
        log("stopped: finished runs are kept; the same command resumes the rest")
        return 75
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
