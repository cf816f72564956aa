"""What several test modules share: the training runs' command lines and settings, synthetic stores and
evaluation sets, and small references; test modules import from here, never from each other."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from wildreid import cli
from wildreid.dtl import tensor_blocks
from wildreid.stores import FeatureStore

ROOT = Path(__file__).resolve().parents[1]

# the session's synthetic VeRi-Wild set (conftest.veriwild_root)
SYNTH = dict(train_vehicles=16, test_vehicles=10, images_per_vehicle=5, cameras=6, image_size=(64, 64), seed=3)


# --memory-budget covers the whole process tree: the interpreter and torch alone are ~700 MiB of it
TRAIN_BUDGET = "2GiB"


SMALL = [
    "train.epochs=3",
    "train.warmup_epochs=1",
    "train.batch_size=16",
    "train.checkpoint_every_steps=3",
    "train.workers=0",
    "train.reextract_every=2",
    "mining.k=11",
    "mining.adjacency=10",
    "mining.min_candidates=5",
    "camera.aware=false",  # the tests of the loop, resume and safety train camera-agnostic; test_camera turns it on
]


def train_command(shards, store, *args, overrides=SMALL, budget=TRAIN_BUDGET) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "wildreid.cli",
        "train",
        "--shards",
        str(shards),
        "--store",
        str(store),
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        "--memory-budget",
        budget,
        "--deterministic",
        "--json",
        *args,
    ]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def train_cli(shards, store, *args, overrides=SMALL, env=None, file_limit=None) -> subprocess.CompletedProcess:
    """``wildreid train`` in a process of its own; the process is forked from one that has imported the CLI
    (``forked_cli``) unless ``env`` sets more than the fault-injection variables, which the forked process
    reads as a fresh one does (torch and OpenMP read their variables when they are first imported)."""
    cmd = train_command(shards, store, *args, overrides=overrides)
    clean = {k: v for k, v in os.environ.items() if k not in ("WILDREID_KILL_AT", "WILDREID_SIGNAL_AT")}
    if all(key.startswith("WILDREID_") for key in env or {}):
        return forked_cli(cmd[3:], {**clean, **(env or {})}, file_limit)
    limit = None if file_limit is None else lambda: limit_file_size(file_limit)
    return subprocess.run(
        cmd, capture_output=True, text=True, env={**clean, **(env or {})}, check=False, preexec_fn=limit
    )


def run_cli(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """``wildreid *argv`` (``argv`` without the program) in a forked process (``forked_cli``), with this
    process's environment and ``env``'s fault-injection variables (WILDREID_*) on top."""
    assert all(key.startswith("WILDREID_") for key in env or {}), "other variables need a plain subprocess"
    return forked_cli(list(argv), {**os.environ, **(env or {})})


def forked_cli(argv: list[str], env: dict, file_limit: int | None = None) -> subprocess.CompletedProcess:
    """``python -m wildreid.cli *argv`` as a process forked from a server that imported the CLI and the model
    code once (multiprocessing's forkserver): a training command line then starts at once instead of spending
    about 7 s of a 2-core machine on importing torch and torchvision. It is a real process (its own pid,
    signal handlers, exit code, file descriptors); only its pages are shared with the server, so tests that
    measure a process's memory from outside run plain subprocesses instead."""
    context = multiprocessing.get_context("forkserver")
    # read when the server starts (the first call); later calls reuse that server
    context.set_forkserver_preload(["helpers", "wildreid.cli", "wildreid.api.model"])
    with tempfile.TemporaryDirectory(prefix="wildreid-cli-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        child = context.Process(target=_run_cli, args=(argv, env, str(out), str(err), file_limit))
        child.start()
        child.join()
        return subprocess.CompletedProcess(
            [sys.executable, "-m", "wildreid.cli", *argv], child.exitcode, out.read_text(), err.read_text()
        )


def _run_cli(argv: list[str], env: dict, out: str, err: str, file_limit: int | None) -> None:
    """The child of ``forked_cli``: the environment, stdout and stderr of a fresh process, then the CLI."""
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    if file_limit is not None:
        limit_file_size(file_limit)
    sys.argv = [sys.executable, *argv]
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:  # what the interpreter of a fresh process would print and exit with
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def limit_file_size(size: int) -> None:
    """A disk that fills up, as the training process sees it: writes past ``size`` bytes fail (EFBIG)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer; ignored, write() fails
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def final_json(run: subprocess.CompletedProcess) -> dict:
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


TWO = ["--nproc-per-node", "2"]


# SMALL in 2 epochs of 5 steps: warm-up, then a rebuild, mining and DPLM steps (time: the suite runs on 2 cores)
RUN = [*(o for o in SMALL if not o.startswith(("train.epochs", "train.reextract_every"))), "train.epochs=2"]


def train_ranks(shards, store, *args, env=None, timeout=600, overrides=RUN) -> subprocess.CompletedProcess:
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("WILDREID_")}
    # one thread per rank: two ranks on two cores, and gloo's sums are then reproducible run to run
    return subprocess.run(
        train_command(shards, store, *args, overrides=overrides),
        capture_output=True,
        text=True,
        env={**clean, "OMP_NUM_THREADS": "1", **(env or {})},
        timeout=timeout,
        check=False,
    )


def traced(prefix: Path, ranks: int) -> dict[tuple[int, int], list[int]]:
    """(epoch, step) -> the global batch's rows, the ranks' shares joined in rank order."""
    steps: dict[tuple[int, int], list[int]] = {}
    for rank in range(ranks):
        for line in Path(f"{prefix}.rank{rank}").read_text().splitlines():
            epoch, step, *rows = line.split()
            steps.setdefault((int(epoch), int(step)), []).extend(int(r) for r in rows)
    return steps


def clustered(n: int, dim: int, *, clusters: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim))
    labels = rng.integers(0, clusters, n)
    x = centers[labels] + noise * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16), labels


def make_store(path, x, labels=None, chunk_rows=128):
    store = FeatureStore.create(
        path, len(x), x.shape[1], dtype=str(x.dtype), ids=labels, chunk_bytes=chunk_rows * x.shape[1] * x.itemsize
    )
    store.write_rows(0, x)
    return path


def positives(path):
    group = zarr.open_group(str(path), mode="r")
    return group["positives/indptr"][:], group["positives/indices"][:]


def graph(path):
    group = zarr.open_group(str(path), mode="r")
    return group["knn/indices"][:], group["knn/similarities"][:], group["knn/counts"][:]


SMALL_BLOCKS = dict(
    base_rows=200,
    query_rows=256,
    rule_rows=300,
    rule_base_rows=150,
    plan_rows=7,
    pending_pairs=50,
    resident_rows=333,
    graph_rows=97,
    workers=2,
    rule_workers=2,
)


def grad_of(fn, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    out["loss"].backward()
    return out, x.grad


def csr(lists):
    indptr = np.cumsum([0] + [len(x) for x in lists])
    return torch.tensor(indptr), torch.tensor(np.concatenate(lists), dtype=torch.long)


def mined_positives(rng, rows, n, max_extra):
    lists = []
    for y in rows.tolist():
        others = rng.choice(np.setdiff1d(np.arange(n), [y]), size=rng.integers(0, max_extra + 1), replace=False)
        lists.append(rng.permutation(np.concatenate([[y], others])))
    return csr(lists)


def span_blocks(m, lo, hi, block_rows):
    return ((lo + start, block) for start, block in tensor_blocks(m[lo:hi], block_rows))


SCALARS = ("mAP", "mINP", "rank1", "rank5", "rank10", "rank20")


def make_set(seed: int, nq: int, ng: int, dim: int = 8, *, ints: bool, vehicles: int = 25, cameras: int = 4):
    """Features (small integers: exact in any summation order, many ties; or L2-normalised floats) and labels.

    Some query ids are absent from the gallery, some are -1: those queries have no true match.
    """
    rng = np.random.default_rng(seed)
    if ints:
        qf = rng.integers(-2, 3, (nq, dim)).astype(np.float32)
        gf = rng.integers(-2, 3, (ng, dim)).astype(np.float32)
    else:
        qf, gf = rng.standard_normal((nq, dim), dtype=np.float32), rng.standard_normal((ng, dim), dtype=np.float32)
        qf /= np.linalg.norm(qf, axis=1, keepdims=True)
        gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    q_ids = rng.integers(-1, vehicles + 3, nq)
    return qf, q_ids, rng.integers(0, cameras, nq), gf, rng.integers(0, vehicles, ng), rng.integers(0, cameras, ng)


def assert_same_metrics(a: dict, b: dict) -> None:
    assert (a["valid_queries"], a["skipped_queries"]) == (b["valid_queries"], b["skipped_queries"])
    for key in SCALARS:
        assert a[key] == pytest.approx(b[key], abs=1e-12), key
    np.testing.assert_allclose(a["cmc"], b["cmc"], rtol=0, atol=1e-12)


def assert_picture(path, *, size: tuple[int, int] | None = None, min_colours: int = 3) -> None:
    """``path`` decodes as a PNG (of ``size``, width x height, when given) with something drawn on it: at
    least ``min_colours`` colours and more than 1 % of its pixels not white."""
    with Image.open(path) as picture:
        assert picture.format == "PNG", picture.format
        if size is not None:
            assert picture.size == size, picture.size
        pixels = np.asarray(picture.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) >= min_colours
    assert (pixels != 255).any(axis=1).mean() > 0.01


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below root, by relative path: equal dicts mean byte-identical trees."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def shuffled_clusters(
    seed: int, *, dtype=np.float16, clusters: int = 40, dim: int = 32, noise: float = 0.5, dups: int = 0
):
    """L2-normalised rows around random centres (mixed cluster sizes, one singleton), shuffled.

    ``dups`` extra rows are exact copies of random rows, plus a block of copies of row 0.
    """
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 25, clusters)
    sizes[0] = 1
    x = np.repeat(rng.standard_normal((clusters, dim)), sizes, axis=0)
    x += noise * rng.standard_normal(x.shape)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(dtype)
    if dups:
        x = np.concatenate([x, x[rng.integers(0, len(x), dups)], np.repeat(x[:1], 30, axis=0)])
    return x[rng.permutation(len(x))]
