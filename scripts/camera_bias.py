"""How much a model's ranking follows the camera: for extracted query/gallery feature groups, the share of
queries whose top-ranked valid gallery image comes from the query's own camera (another vehicle there), and
mAP / rank-1 under the standard protocol and camera-normalised (``wildreid eval --camera-norm``).

    python scripts/camera_bias.py RUN/train/features [MORE ...] [--split large]

``RUN/train/features`` is where ``wildreid eval --checkpoint RUN/train/model.pt`` extracts to.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from wildreid.camera import camera_means, camera_normalise
from wildreid.distances import grid_distances
from wildreid.evaluation import per_query_metrics
from wildreid.stores import FeatureStore


def own_camera_top1(dist: np.ndarray, q_ids, q_cams, g_ids, g_cams) -> float:
    """Share of queries whose best valid gallery row (same-vehicle same-camera junk removed) has their camera."""
    dist = np.array(dist, dtype=np.float64)
    dist[(g_ids[None] == q_ids[:, None]) & (g_cams[None] == q_cams[:, None])] = np.inf
    return float(np.mean(g_cams[np.argmin(dist, axis=1)] == q_cams))


def report(features: Path, split: str) -> dict:
    q, g = FeatureStore.open(features / f"query-{split}"), FeatureStore.open(features / f"gallery-{split}")
    qf, gf = q.read_rows(0, q.count()), g.read_rows(0, g.count())
    labels = (q.ids(), q.camids(), g.ids(), g.camids())
    out = {"features": str(features), "queries": q.count(), "cameras": int(len(np.unique(labels[3])))}
    means = camera_means([(q, labels[1]), (g, labels[3])])
    for name, (a, b) in (
        ("standard", (qf, gf)),
        ("camera-normalised", (camera_normalise(qf, labels[1], means), camera_normalise(gf, labels[3], means))),
    ):
        dist = grid_distances(a, 0, b, 0)
        ap, hit = per_query_metrics(dist, *labels)
        out[name] = {
            "mAP": float(np.nanmean(ap)),
            "rank1": float(np.nanmean(hit)),
            "own_camera_top1": own_camera_top1(dist, *labels),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("features", type=Path, nargs="+")
    p.add_argument("--split", default="large")
    a = p.parse_args(argv)
    print("| features | protocol | mAP | rank-1 | top-1 from the query's camera | chance |")
    print("|---|---|---:|---:|---:|---:|")
    for folder in a.features:
        r = report(folder, a.split)
        for name in ("standard", "camera-normalised"):
            m = r[name]
            print(
                f"| {folder} | {name} | {100 * m['mAP']:.1f} % | {100 * m['rank1']:.1f} % "
                f"| {100 * m['own_camera_top1']:.0f} % | {100 / r['cameras']:.0f} % |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
