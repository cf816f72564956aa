"""The statistics of scripts/bench_accuracy.py: paired two-level bootstrap intervals, seed means, the table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "bench_accuracy.py"
_spec = importlib.util.spec_from_file_location("bench_accuracy", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def scores(seed: int, shape=(5, 240), shift: float = 0.0):
    """Per-query AP-like scores in [0, 1], a query difficulty shared by all seeds plus seed and query noise."""
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(0, 1, shape[1])
    return np.clip(difficulty[None, :] + shift + 0.1 * rng.standard_normal(shape), 0, 1), difficulty


def test_identical_inputs_give_zero():
    a, _ = scores(0)
    ci = bench.paired_bootstrap(a, a.copy())
    assert (ci["delta"], ci["low"], ci["high"], ci["seeds"], ci["queries"]) == (0.0, 0.0, 0.0, 5, 240)


def test_clear_shift_excludes_zero_and_is_antisymmetric():
    rng = np.random.default_rng(1)
    b, _ = scores(1)
    a = np.clip(b + 0.05 + 0.05 * rng.standard_normal(b.shape), 0, 1)
    up, down = bench.paired_bootstrap(a, b), bench.paired_bootstrap(b, a)
    assert 0 < up["low"] <= up["delta"] <= up["high"] < 0.1
    assert up["delta"] == pytest.approx(a.mean() - b.mean())
    assert (down["delta"], down["low"], down["high"]) == pytest.approx((-up["delta"], -up["high"], -up["low"]))


def test_noise_only_includes_zero():
    rng = np.random.default_rng(2)
    b, _ = scores(2)
    a = b + 0.05 * rng.standard_normal(b.shape)
    a -= a.mean() - b.mean()  # no shift at all, only paired noise
    ci = bench.paired_bootstrap(a, b)
    assert ci["low"] < 0 < ci["high"]


def test_seed_to_seed_spread_widens_the_interval():
    b, _ = scores(3)
    same = b + 0.02
    spread = b + np.array([-0.08, 0.12, -0.06, 0.10, 0.02])[:, None]  # the same mean shift, seeds disagree
    narrow, wide = bench.paired_bootstrap(same, b), bench.paired_bootstrap(spread, b)
    assert narrow["delta"] == pytest.approx(wide["delta"])
    assert wide["high"] - wide["low"] > 5 * (narrow["high"] - narrow["low"])
    assert wide["low"] < 0 < wide["high"]


def test_query_resampling_is_shared_by_the_pair():
    # a constant per-query difference: whatever queries are drawn, the paired difference is the same
    b, _ = scores(4)
    ci = bench.paired_bootstrap(b + 0.03, b)
    assert ci["low"] == pytest.approx(0.03) and ci["high"] == pytest.approx(0.03)


def test_bootstrap_is_seeded():
    a, _ = scores(5)
    b, _ = scores(6)
    assert bench.paired_bootstrap(a, b, seed=7) == bench.paired_bootstrap(a, b, seed=7)
    ws, wq = bench.bootstrap_draws(3, 10, resamples=50, seed=0)
    assert ws.shape == (50, 3) and wq.shape == (50, 10)
    assert (ws.sum(axis=1) == 3).all() and (wq.sum(axis=1) == 10).all()


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.zeros((2, 3)), np.zeros((2, 4)), "one non-empty shape"),
        (np.zeros(3), np.zeros(3), "one non-empty shape"),
        (np.zeros((0, 3)), np.zeros((0, 3)), "one non-empty shape"),
        (np.full((2, 3), np.nan), np.zeros((2, 3)), "no NaN"),
    ],
)
def test_bad_inputs(a, b, match):
    with pytest.raises(ValueError, match=match):
        bench.paired_bootstrap(a, b)


def test_seed_means():
    out = bench.seed_means([[0.0, 1.0], [1.0, 1.0], [0.5, 0.5]])
    assert out["per_seed"] == [0.5, 1.0, 0.5] and out["mean"] == pytest.approx(2 / 3)
    assert out["sd"] == pytest.approx(np.std([0.5, 1.0, 0.5], ddof=1))
    assert bench.seed_means([[0.2, 0.4]])["sd"] == 0.0


def test_compare_and_markdown():
    base, _ = scores(8, (3, 50))

    def run(x):
        return {s: {"ap": x[s].tolist(), "hit1": (x[s] > 0.5).astype(float).tolist()} for s in range(len(x))}

    results = {"untrained": run(base), "defaults": run(np.clip(base + 0.2, 0, 1)), "published": run(base)}
    results["published"].pop(2)  # a seed not finished: the pair uses the two both have
    table = bench.compare(results, resamples=500)
    assert "vs_untrained" not in table["untrained"] and "vs_published" not in table["published"]
    assert table["defaults"]["vs_untrained"]["mAP"]["low"] > 0
    assert table["defaults"]["vs_published"]["mAP"]["seeds"] == 2
    assert table["published"]["seeds"] == [0, 1]
    text = bench.markdown({"scratch": table})
    lines = text.splitlines()
    assert len(lines) == 5 and all(line.count("|") == 10 for line in lines)
    assert lines[2].startswith("| scratch | untrained | 3 |") and "| – | – | +0.0 [+0.0, +0.0] |" in lines[2]
    assert "[+" in lines[3] and lines[4].endswith("| – | – |")


def test_camera_normalised_metrics_get_their_own_table():
    base, _ = scores(9, (2, 40))

    def run(x, shift):
        return {
            s: {
                "ap": x[s].tolist(),
                "hit1": (x[s] > 0.5).astype(float).tolist(),
                "ap_camnorm": np.clip(x[s] + shift, 0, 1).tolist(),
                "hit1_camnorm": (x[s] + shift > 0.5).astype(float).tolist(),
            }
            for s in range(len(x))
        }

    table = bench.compare({"untrained": run(base, 0.0), "defaults": run(base, 0.3)}, resamples=300)
    row = table["defaults"]
    assert row["vs_untrained"]["mAP"]["delta"] == 0 and row["vs_untrained"]["mAP_camnorm"]["low"] > 0
    plain, normalised = bench.markdown({"s": table}), bench.markdown({"s": table}, "_camnorm")
    assert plain != normalised and "+30.0" not in plain and normalised.count("|") == plain.count("|")
    # a run scored before camera normalisation lacks those keys: only the standard table is made
    partial = {"untrained": run(base, 0.0), "defaults": run(base, 0.3)}
    del partial["defaults"][1]["ap_camnorm"]
    assert "mAP_camnorm" not in bench.compare(partial, resamples=100)["defaults"]


def test_extra_pairs_compare_two_settings_on_their_common_seeds():
    base, _ = scores(10, (3, 30))

    def run(x):
        return {s: {"ap": x[s].tolist(), "hit1": (x[s] > 0.5).astype(float).tolist()} for s in range(len(x))}

    results = {"defaults": run(np.clip(base + 0.1, 0, 1)), "order-published": run(base)}
    results["order-published"].pop(0)
    pairs = bench.compare_pairs(results, [("defaults", "order-published"), ("defaults", "missing")], resamples=300)
    assert list(pairs) == ["defaults vs order-published"]
    row = pairs["defaults vs order-published"]
    assert row["mAP"]["seeds"] == 2 and row["mAP"]["low"] > 0
    text = bench.pairs_markdown({"scratch": pairs})
    assert text.splitlines()[2].startswith("| scratch | defaults vs order-published | 2 | +")
