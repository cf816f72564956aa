"""Camera-aware SSML-FD: each camera's mean feature, and the camera-normalised dictionary DPLM mines.

Features learnt without labels carry much of each camera's look (background, light, viewpoint), so
a row's nearest dictionary rows are mostly other vehicles seen by the same camera, and DPLM mines
them as positives. With ``camera.normalise`` the k-NN graph and the rules run on the dictionary
with every row's camera mean removed and the row L2-normalised again (``camera_normalise``): the
means form a small cameras x D table (``camera_means``, float64 sums over blocks of rows, never
N x N nor N x D at once).

The normalised rows live in a store of their own inside the run's store (``STORE/camera``:
``features``, ``ids``, ``camids`` as the dictionary, plus the table as ``means`` (C, D) and
``mean_cams`` (C,)), written in the dictionary's dtype and chunks, so mining runs on it exactly
as on any store: blockwise, resumable, under the same budget, on dask or inside the ranks of a
distributed run. The copy records the fingerprint of the dictionary it was made from and is
remade whenever the dictionary changed since (every write bumps its version): one blockwise pass
per mining, a small part of the k-NN stage's passes, and exact, where a running sum updated by
every step would drift with rounding and would need collectives over the ranks' rows.

Camera-aware candidate lists (``camera.intra_penalty`` = delta > 0): DPLM ranks a row's
own-camera neighbours and its other-camera neighbours separately, each by similarity, and merges
the two lists by ``s_ij - delta`` for the own-camera ones against ``s_ij`` for the others; the
threshold rule counts the merged values too. So an own-camera neighbour precedes another camera's
only when it is more similar by delta, and the cross-camera candidates are no longer crowded out of
sigma_i, k_i and the rank checks by the confusers that share the background (the idea of
CA-Jaccard's separate intra- and inter-camera neighbour lists, in DPLM's one ranked list). Rule 4's
adjacency Gram stays on the rows themselves. The merged value is one exact dot product of two
widened rows (``camera_rows``): the query side gets +c at its camera's column, the other side -c,
c = sqrt(delta) rounded to the rows' dtype, so delta is c * c exactly and the blockwise k-NN, its
error bands and the rank counts work unchanged, C columns wider.
"""

from __future__ import annotations

import numpy as np

from wildreid.core.errors import StoreError
from wildreid.stores import FeatureStore, create_checked_array, remove_tree
from wildreid.stores.rows import Rows
from wildreid.world import World

__all__ = [
    "CAMERA_STORE",
    "camera_means",
    "camera_normalise",
    "camera_columns",
    "camera_rows",
    "camera_scale",
    "means_table",
    "mined_means",
    "normalised_dictionary",
    "unknown_cameras",
]

CAMERA_STORE = "camera"  # the normalised copy's folder inside the run's store


def unknown_cameras(camids) -> int:
    """How many rows have no camera id (-1): camera-aware training needs none."""
    return int(np.count_nonzero(np.asarray(camids) < 0))


def camera_means(sources: list[tuple[Rows, np.ndarray]], *, block_rows: int = 16384) -> dict[int, np.ndarray]:
    """Mean feature (float64) of every camera over the rows of all ``(features, camids)`` pairs, read blockwise."""
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for features, cams in sources:
        for start, block in features.blocks(block_rows):
            block = block.astype(np.float64)
            block_cams = cams[start : start + len(block)]
            for cam in np.unique(block_cams):
                rows = block_cams == cam
                sums[int(cam)] = sums.get(int(cam), 0.0) + block[rows].sum(axis=0)
                counts[int(cam)] = counts.get(int(cam), 0) + int(rows.sum())
    return {cam: sums[cam] / counts[cam] for cam in sums}


def camera_normalise(x: np.ndarray, cams: np.ndarray, means: dict[int, np.ndarray]) -> np.ndarray:
    """Rows of ``x`` minus their camera's mean, L2-normalised (a row equal to its camera's mean stays zero)."""
    centred = np.asarray(x, np.float64) - np.stack([means[int(c)] for c in cams]) if len(x) else np.asarray(x)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return (centred / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def camera_columns(camids) -> np.ndarray:
    """Each row's column among the cameras present (their ids ascending), for ``camera_rows``."""
    camids = np.asarray(camids, dtype=np.int64)
    if unknown_cameras(camids):
        raise StoreError(
            f"camera-aware candidate lists need the camera id of every row, but {unknown_cameras(camids)} of "
            f"{len(camids)} are unknown (-1); shard with --camera-from, or leave camera.intra_penalty at 0"
        )
    return np.unique(camids, return_inverse=True)[1].reshape(-1).astype(np.int64)


def camera_scale(penalty: float, dtype) -> float:
    """c = sqrt(delta) rounded to ``dtype`` (the stored rows'), so every pass widens its rows with the same c."""
    return float(np.asarray(np.sqrt(penalty)).astype(dtype))


def camera_rows(block: np.ndarray, columns: np.ndarray, cameras: int, scale: float, out=None) -> np.ndarray:
    """``[block, scale * onehot(columns)]`` in the block's dtype: one side of the camera-aware similarity.

    ``camera_rows(x_i, +c) . camera_rows(x_j, -c) = s_ij - c^2 [same camera]``; ``scale`` is rounded to the
    block's dtype first (the same c for every block of a pass, whatever its dtype: callers round it once).
    """
    block = np.asarray(block)
    shape = (len(block), block.shape[1] + cameras)
    out = np.empty(shape, dtype=block.dtype) if out is None else out
    out[:, : block.shape[1]] = block
    out[:, block.shape[1] :] = 0
    out[np.arange(len(block)), block.shape[1] + np.asarray(columns, dtype=np.int64)] = scale
    return out


def means_table(means: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(cameras (C,) ascending, table (C, D) float64)`` of a ``camera_means`` dict."""
    cams = np.array(sorted(means), dtype=np.int64)
    table = np.stack([means[int(c)] for c in cams]) if len(cams) else np.zeros((0, 0))
    return cams, table


def normalised_dictionary(store: FeatureStore, world: World = World()) -> FeatureStore:
    """The camera-normalised copy of ``store``'s dictionary (``STORE/camera``, its means table in ``means``),
    made or remade when the dictionary changed since. Rank 0 writes it; every rank then opens it.

    The copy is written chunk by chunk: a block of the dictionary's chunk rows in float64 at a time.
    """
    path = store.path / CAMERA_STORE
    if world.main:
        _write_copy(store, path)
    world.barrier()
    return FeatureStore.open(path, mode="r+", meta_writer=world.main)


def mined_means(store: FeatureStore) -> dict | None:
    """The means table DPLM last mined with (a checkpoint keeps it): ``{"cameras", "means", "source"}``, or
    None when the run has no finished normalised copy."""
    copy = _open_copy(store, store.path / CAMERA_STORE)
    if copy is None or copy.meta("source") is None or not copy.has("means"):
        return None
    return {
        "cameras": copy.array("mean_cams")[:].tolist(),
        "means": np.asarray(copy.array("means")[:], dtype=np.float64),
        "source": copy.meta("source"),
    }


def _write_copy(store: FeatureStore, path) -> None:
    source = store.fingerprint()
    camids = store.camids()
    unknown = unknown_cameras(camids)
    if unknown:
        raise StoreError(
            f"{store.path}: {unknown:,} rows have no camera id (-1); the camera-normalised "
            "dictionary needs every row's camera: set camera.aware=false"
        )
    copy = _open_copy(store, path)
    if copy is not None and copy.meta("source") == source:
        return
    if copy is not None:
        copy.write_labels(0, store.ids(), camids)  # (a new copy is made with them)
    else:
        remove_tree(path)
        chunk_bytes = store.chunk_rows * store.dim() * store.features.dtype.itemsize
        copy = FeatureStore.create(
            path,
            store.count(),
            store.dim(),
            dtype=str(store.features.dtype),
            ids=store.ids(),
            camids=camids,
            chunk_bytes=chunk_bytes,
        )
    block = store.chunk_rows
    means = camera_means([(store, camids)], block_rows=block)
    cams, table = means_table(means)
    copy.set_meta("source", None)  # a copy being rewritten is never taken for a finished one
    for start in range(0, store.count(), block):
        stop = min(start + block, store.count())
        copy.write_rows(start, camera_normalise(store.read_rows(start, stop), camids[start:stop], means))
    for name, values in (("means", table), ("mean_cams", cams)):
        if copy.has(name):
            copy.remove(name)
        array = create_checked_array(copy.group, name, shape=values.shape, dtype=values.dtype, fill_value=0)
        array[...] = values
    copy.set_meta("source", source)


def _open_copy(store: FeatureStore, path) -> FeatureStore | None:
    """The existing copy when its shape, dtype and chunks fit the dictionary (its rows are then rewritten in
    place); None when there is none or it does not fit (it is then made anew)."""
    if not (path / "zarr.json").exists():
        return None
    try:
        copy = FeatureStore.open(path, mode="r+")
    except StoreError:
        return None
    same = (
        copy.count() == store.count()
        and copy.dim() == store.dim()
        and copy.features.dtype == store.features.dtype
        and copy.chunk_rows == store.chunk_rows
    )
    return copy if same else None
