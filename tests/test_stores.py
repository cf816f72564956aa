from __future__ import annotations

import numpy as np
import pytest
import zarr

from wildreid.core.errors import ConfigError, StoreError
from wildreid.stores import FeatureStore, PageCache


def _store(tmp_path, n=100, dim=8, chunk_rows=10, dtype="float32"):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((n, dim)).astype(dtype)
    store = FeatureStore.create(
        tmp_path / "s.zarr",
        n,
        dim,
        dtype=dtype,
        ids=np.arange(n) // 4,
        keys=[f"k{i}" for i in range(n)],
        chunk_bytes=chunk_rows * dim * np.dtype(dtype).itemsize,
    )
    store.write_rows(0, values)
    return store, values


def test_store_round_trip(tmp_path):
    store, values = _store(tmp_path, dtype="float16")
    again = FeatureStore.open(tmp_path / "s.zarr")
    assert (again.count(), again.dim(), again.chunk_rows) == (100, 8, 10)
    assert np.array_equal(again.read_rows(0, 100), values.astype(np.float32))
    assert np.array_equal(again.ids(), np.arange(100) // 4)
    assert np.all(again.camids() == -1)
    assert again.group["keys"][3] == "k3"
    with pytest.raises(StoreError, match="read-only"):
        again.write_rows(0, values[:2])


def test_any_group_with_features_is_a_store(tmp_path):
    group = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    group.create_array("features", shape=(5, 3), chunks=(5, 3), dtype="float32")
    store = FeatureStore.open(tmp_path / "other.zarr")
    assert store.count() == 5 and np.all(store.ids() == -1)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda g: g.create_array("ids", shape=(5,), dtype="int64"), "no 2-D 'features'"),
        (lambda g: g.create_array("features", shape=(5,), dtype="float32"), "no 2-D 'features'"),
        (
            lambda g: (
                g.create_array("features", shape=(5, 3), dtype="float32"),
                g.create_array("ids", shape=(4,), dtype="int64"),
            ),
            "expected \\(5,\\)",
        ),
    ],
)
def test_bad_stores(tmp_path, make, message):
    make(zarr.open_group(str(tmp_path / "bad.zarr"), mode="w"))
    with pytest.raises(StoreError, match=message):
        FeatureStore.open(tmp_path / "bad.zarr")
    with pytest.raises(StoreError, match="does not exist"):
        FeatureStore.open(tmp_path / "missing.zarr")


@pytest.mark.slow
@pytest.mark.parametrize("device_pages", [0, 2])
def test_page_cache_matches_a_dense_mirror(tmp_path, device_pages):
    store, values = _store(tmp_path)
    page_bytes = 10 * 8 * 4
    cache = PageCache(store.features, host_budget=3 * page_bytes, device_budget=device_pages * page_bytes)
    mirror = values.copy()
    rng = np.random.default_rng(1)
    for _ in range(200):
        idx = rng.integers(0, 100, size=rng.integers(1, 12))
        if rng.random() < 0.4:
            new = rng.standard_normal((len(idx), 8)).astype(np.float32)
            cache.set_rows(idx, new)
            mirror[idx] = new  # last write wins for repeated indices, as in numpy
        elif rng.random() < 0.5:
            assert np.array_equal(cache.gather(idx), mirror[idx])
        else:  # the tensor path gathers device pages on the device
            assert np.array_equal(cache.get_rows_tensor(idx, "cpu").numpy(), mirror[idx])
        assert cache.resident_bytes <= (3 + device_pages) * page_bytes
    assert cache.stats["evictions"] > 0 and cache.stats["writebacks"] > 0
    if device_pages:
        assert len(cache.on_device) == device_pages
        assert cache.stats["promotions"] >= device_pages and cache.stats["device_hits"] > 0
        assert np.array_equal(cache.get_rows_tensor(np.arange(100)).numpy(), mirror)
    else:
        assert cache.stats["device_hits"] == cache.stats["promotions"] == 0
    # a scan sees dirty rows before they are written back, host or device pages alike
    assert np.array_equal(np.concatenate([b for _, b in cache.blocks(20)]), mirror)
    assert np.array_equal(np.concatenate([b.numpy() for _, b in cache.scan_tensors("cpu")]), mirror)
    cache.flush()
    assert not cache.dirty
    assert np.array_equal(store.read_rows(0, 100), mirror)


def test_a_dictionary_within_the_device_budget_lives_there(tmp_path):
    store, values = _store(tmp_path)
    page_bytes = 10 * 8 * 4
    small = PageCache(store.features, host_budget=page_bytes, device_budget=9 * page_bytes)
    assert not small.load_all_to_device()  # 10 pages do not fit 9
    cache = PageCache(store.features, host_budget=page_bytes, device_budget=10 * page_bytes)
    assert cache.load_all_to_device() and len(cache.on_device) == 10 and not cache.host
    cache.set_rows(np.array([3, 97]), np.ones((2, 8), np.float32))
    values[[3, 97]] = 1
    got = cache.get_rows_tensor(np.array([97, 3, 50]))
    assert np.array_equal(got.numpy(), values[[97, 3, 50]])
    assert cache.stats["misses"] == 0 and cache.stats["device_hits"] == cache.stats["hits"] > 0
    cache.flush()
    assert np.array_equal(store.read_rows(0, 100), values)


def test_a_rank_s_cache_touches_only_the_rows_it_owns(tmp_path):
    store, values = _store(tmp_path)  # 100 rows in pages of 10
    page_bytes = 10 * 8 * 4
    cache = PageCache(store.features, host_budget=2 * page_bytes, device_budget=3 * page_bytes, span=(30, 60))
    assert [start for start, _ in cache.scan_tensors("cpu")] == [30, 40, 50]
    assert np.array_equal(np.concatenate([b for _, b in cache.blocks()]), values[30:60])
    assert cache.load_all_to_device() and sorted(cache.on_device) == [3, 4, 5]
    cache.set_rows(np.array([59, 30]), np.full((2, 8), 2, np.float32))
    for outside in ([29], [60], [0, 45]):
        with pytest.raises(ConfigError, match="span 30..59"):
            cache.gather(np.array(outside))
        with pytest.raises(ConfigError, match="span 30..59"):
            cache.set_rows(np.array(outside), np.zeros((len(outside), 8), np.float32))
    cache.flush()
    values[[59, 30]] = 2
    assert np.array_equal(store.read_rows(0, 100), values)  # the other rows untouched
    with pytest.raises(ConfigError, match="whole pages"):
        PageCache(store.features, host_budget=page_bytes, span=(5, 60))


def test_page_cache_budget_too_small(tmp_path):
    store, _ = _store(tmp_path)
    with pytest.raises(ConfigError, match="smallest budget that works is 320 bytes"):
        PageCache(store.features, host_budget=100)


def test_read_into_a_buffer_of_another_dtype(tmp_path):
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((50, 6)).astype(np.float16)
    arr = zarr.open_array(tmp_path / "a.zarr", mode="w", shape=rows.shape, chunks=(8, 6), dtype="float16")
    arr[:] = rows
    cache = PageCache(arr, host_budget=1 << 20, dtype=np.float16)
    out = np.full((45, 6), np.nan)  # float64: converted while copied, values exact
    assert cache.read(3, 48, out=out) is out
    np.testing.assert_array_equal(out, rows[3:48].astype(np.float64))
    np.testing.assert_array_equal(cache.read(3, 48), rows[3:48])
    with pytest.raises(ConfigError, match="out array of shape"):
        cache.read(0, 10, out=np.empty((9, 6)))
