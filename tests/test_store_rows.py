"""Byte-range row reads (wildreid.stores.rows) against Zarr's own reads of the same real stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from wildreid.core.errors import DamagedDataError
from wildreid.stores import FeatureStore, create_checked_array
from wildreid.stores.rows import RowReader


def _store(path: Path, dtype: str, n: int = 1000, dim: int = 24, chunk_rows: int = 128) -> np.ndarray:
    x = np.random.default_rng(1).standard_normal((n, dim)).astype(dtype)
    store = FeatureStore.create(path, n, dim, dtype=dtype, chunk_bytes=chunk_rows * dim * np.dtype(dtype).itemsize)
    store.write_rows(0, x)
    return x


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_ranges_and_gathers_equal_zarr_reads(tmp_path, dtype):
    x = _store(tmp_path / "s.zarr", dtype)
    reader = FeatureStore.open(tmp_path / "s.zarr").row_reader()
    assert reader.partial and reader.rows_per_chunk == 128
    for start, stop in [(0, 1000), (5, 6), (127, 129), (128, 256), (300, 999), (999, 1000)]:
        np.testing.assert_array_equal(reader.read(start, stop), x[start:stop])
    out = np.zeros((50, 24), dtype=dtype)
    assert reader.read(100, 150, out) is out and np.array_equal(out, x[100:150])
    ids = np.random.default_rng(2).integers(0, 1000, 700)
    ids[:5] = [999, 0, 999, 512, 0]  # unsorted, repeated, both ends
    np.testing.assert_array_equal(reader.gather(ids), x[ids])
    assert reader.gather(np.zeros(0, np.int64)).shape == (0, 24)


def test_other_layouts_fall_back_to_whole_chunk_reads(tmp_path):
    group = zarr.open_group(str(tmp_path / "z.zarr"), mode="w")
    x = np.arange(600, dtype=np.float32).reshape(100, 6)
    compressed = create_checked_array(group, "features", shape=x.shape, chunks=(16, 6), dtype="float32", compress=True)
    compressed[:] = x
    reader = RowReader(FeatureStore.open(tmp_path / "z.zarr").array("features"), tmp_path / "z.zarr")
    assert not reader.partial
    np.testing.assert_array_equal(reader.read(10, 70), x[10:70])
    np.testing.assert_array_equal(reader.gather(np.array([99, 3, 3, 50])), x[[99, 3, 3, 50]])


def test_a_missing_chunk_reads_as_the_fill_value(tmp_path):
    x = _store(tmp_path / "s.zarr", "float32")
    (tmp_path / "s.zarr" / "features" / "c" / "2" / "0").unlink()  # Zarr leaves all-fill chunks unwritten
    store = FeatureStore.open(tmp_path / "s.zarr")
    expected = store.features[:]
    assert not expected[256:384].any() and np.array_equal(expected[:256], x[:256])
    np.testing.assert_array_equal(store.row_reader().read(200, 400), expected[200:400])


@pytest.mark.parametrize("how", ["flip", "truncate", "pad"])
def test_damage_is_one_line_naming_the_chunk(tmp_path, how):
    _store(tmp_path / "s.zarr", "float32")
    chunk = tmp_path / "s.zarr" / "features" / "c" / "3" / "0"
    data = bytearray(chunk.read_bytes())
    if how == "flip":
        data[len(data) // 3] ^= 0x10
    elif how == "truncate":
        data = data[: len(data) // 2]
    else:
        data += b"\0" * 8
    chunk.write_bytes(bytes(data))
    reader = FeatureStore.open(tmp_path / "s.zarr").row_reader()
    np.testing.assert_array_equal(reader.read(0, 384).shape, (384, 24))  # other chunks still read
    with pytest.raises(DamagedDataError) as caught:
        reader.read(400, 401)  # one row of the chunk: the whole chunk's checksum is checked first
    message = str(caught.value)
    assert f"chunk 3 of features (rows 384-511, file {chunk})" in message and "\n" not in message
    assert ("fails its checksum" if how == "flip" else "is truncated or padded") in message
    assert "wildreid train --resume" in message
    with pytest.raises(DamagedDataError):
        reader.gather(np.array([5, 450]))
