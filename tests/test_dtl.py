"""DTL: the streaming path against the dense reference (loss, gradient, selection), counts, momentum update."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import csr, grad_of, mined_positives, span_blocks

from wildreid.core.errors import ConfigError
from wildreid.dtl import (
    batch_positives,
    dtl_dense,
    dtl_loss,
    dtl_partial,
    dtl_streaming,
    gathered_dot,
    graph_negatives,
    hard_negative_counts,
    hard_negatives,
    keys_to_rows,
    momentum_update,
    order_keys,
    select_hard,
    self_positives,
    span_candidates,
    tensor_blocks,
    tensor_rows,
)

DEVICE = torch.device("cpu")


def normalised(rng: np.random.Generator, n: int, d: int) -> torch.Tensor:
    return F.normalize(torch.from_numpy(rng.standard_normal((n, d))), dim=1)


def both(x, m, rows, indptr, indices, r, delta, block_rows, chunk_rows=3):
    dense, g_dense = grad_of(lambda v: dtl_dense(v, m, rows, indptr, indices, r, delta), x)
    stream, g_stream = grad_of(
        lambda v: dtl_streaming(
            v,
            tensor_blocks(m, block_rows),
            tensor_rows(m),
            rows,
            indptr,
            indices,
            r,
            delta,
            count=len(m),
            chunk_rows=chunk_rows,
        ),
        x,
    )
    return dense, g_dense, stream, g_stream


def assert_same(dense, g_dense, stream, g_stream):
    torch.testing.assert_close(stream["hard"], dense["hard"], rtol=0, atol=0)
    for key in ("loss", "positive", "negative"):
        torch.testing.assert_close(stream[key], dense[key], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_stream, g_dense, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("block_rows", [1, 7, 250])
@pytest.mark.parametrize(("r", "max_extra"), [(0.01, 0), (0.05, 6), (0.3, 3)])
def test_streaming_equals_dense(block_rows, r, max_extra):
    rng = np.random.default_rng(1)
    n, d, b = 250, 16, 9
    m = normalised(rng, n, d)
    x = normalised(rng, b, d)
    rows = torch.tensor(rng.choice(n, size=b, replace=False))
    indptr, indices = mined_positives(rng, rows, n, max_extra) if max_extra else self_positives(rows)
    dense, g_dense, stream, g_stream = both(x, m, rows, indptr, indices, r, 0.4, min(block_rows, n))
    assert_same(dense, g_dense, stream, g_stream)
    assert g_dense.abs().sum() > 0
    counts = torch.count_nonzero(dense["hard"] >= 0, dim=1)
    np.testing.assert_array_equal(counts.numpy(), np.floor(r * (n - np.diff(indptr.numpy())) + 1e-9))


@pytest.mark.parametrize("cuts", [(0, 250), (0, 100, 250), (0, 8, 120, 121, 250), (0, 0, 250)])
@pytest.mark.parametrize(("r", "max_extra"), [(0.01, 0), (0.05, 6), (0.3, 3)])
def test_spans_of_a_partition_add_up_to_the_dense_loss(cuts, r, max_extra):
    """What each rank of a distributed run computes over the rows it owns, merged, is the single-process DTL."""
    rng = np.random.default_rng(5)
    n, d, b, delta = 250, 16, 9, 0.4
    m = normalised(rng, n, d)
    x = normalised(rng, b, d)
    rows = torch.tensor(rng.choice(n, size=b, replace=False))
    indptr, indices = mined_positives(rng, rows, n, max_extra) if max_extra else self_positives(rows)
    dense, g_dense = grad_of(lambda v: dtl_dense(v, m, rows, indptr, indices, r, delta), x)
    for dtype in (torch.float64, torch.float32):  # float32: the packed-key path training takes
        spans = list(zip(cuts[:-1], cuts[1:]))
        xs = x.to(dtype).clone().requires_grad_(True)
        found = [
            span_candidates(xs, span_blocks(m.to(dtype), lo, hi, 7), indptr, indices, rows, r, count=n, span=(lo, hi))
            for lo, hi in spans
        ]
        hard = select_hard(torch.cat([f[0] for f in found], 1), torch.cat([f[1] for f in found], 1), found[0][2])
        parts = [
            dtl_partial(xs, tensor_rows(m.to(dtype)), rows, indptr, indices, hard, delta, span=s, chunk_rows=3)
            for s in spans
        ]
        total = {key: sum(p[key] for p in parts) for key in ("loss", "positive", "negative")}
        total["loss"].backward()
        torch.testing.assert_close(hard, dense["hard"], rtol=0, atol=0)
        tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
        for key in ("loss", "positive", "negative"):
            torch.testing.assert_close(total[key].double(), dense[key], **tol)
        torch.testing.assert_close(xs.grad.double(), g_dense, **tol)
    assert g_dense.abs().sum() > 0


def test_a_span_refuses_blocks_outside_it_and_rows_it_does_not_cover():
    rng = np.random.default_rng(6)
    m, x = normalised(rng, 20, 4), normalised(rng, 2, 4)
    rows = torch.tensor([0, 15])
    indptr, indices = self_positives(rows)
    with pytest.raises(ConfigError, match="inside rows 10..19"):
        span_candidates(x, tensor_blocks(m, 5), indptr, indices, rows, 0.2, count=20, span=(10, 20))
    with pytest.raises(ConfigError, match="covering rows 10..19"):
        span_candidates(x, span_blocks(m, 10, 15, 5), indptr, indices, rows, 0.2, count=20, span=(10, 20))


def test_dense_matches_the_formula():
    rng = np.random.default_rng(2)
    n, d, b, r, delta = 40, 5, 3, 0.1, 0.4
    m, x = normalised(rng, n, d), normalised(rng, b, d)
    rows = torch.tensor([4, 9, 30])
    indptr, indices = csr([np.array([4, 17]), np.array([9]), np.array([30, 0, 1])])
    out = dtl_dense(x, m, rows, indptr, indices, r, delta)
    expected = []
    for k, pos in enumerate([[4, 17], [9], [30, 0, 1]]):
        z = (x[k] @ m.T).numpy()
        neg = np.setdiff1d(np.arange(n), pos)
        hard = neg[np.argsort(-z[neg], kind="stable")][: int(np.floor(r * len(neg)))]
        assert sorted(out["hard"][k][out["hard"][k] >= 0].tolist()) == sorted(hard.tolist())
        expected.append(np.mean((1 - z[pos]) ** 2) + delta * np.mean((1 + z[hard]) ** 2))
    assert len(hard) == 3  # floor(0.1 * 37)
    np.testing.assert_allclose(out["loss"].item(), np.mean(expected), rtol=1e-12)


@pytest.mark.parametrize("block_rows", [1, 7, 30])
def test_ties_go_to_the_lower_row(block_rows):
    # Entries are small dyadic numbers, so every z is exact whatever the summation order,
    # and rows 3, 11, 12 and 25 tie exactly with different vectors (different gradients).
    n, d = 30, 4
    rng = np.random.default_rng(3)
    m = torch.from_numpy(rng.integers(-4, 5, size=(n, d)) / 8.0)
    m[:, 0] = -0.5
    for j, other in zip((3, 11, 12, 25), ([1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0])):
        m[j] = torch.tensor([1.0, *other])
    m[20] = m[11]  # a duplicate row: the same z and the same gradient
    x = torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    rows = torch.tensor([0, 3])
    indptr, indices = self_positives(rows)
    r = 0.1  # floor(0.1 * 29) = 2 of the 5 rows that tie at z = 0.5
    dense, g_dense, stream, g_stream = both(x, m, rows, indptr, indices, r, 0.4, block_rows)
    assert dense["hard"].tolist() == [[3, 11], [11, 12]]
    assert_same(dense, g_dense, stream, g_stream)


@pytest.mark.parametrize("block_rows", [1, 5, 64, 400])
@pytest.mark.parametrize("r", [0.01, 0.1, 0.5])
def test_float32_top_k_keys_select_as_the_sorting_reference(block_rows, r):
    # Dyadic entries: z is exact in float32 and float64, with many exact ties, zeros of both
    # signs and negatives; float32 takes the packed-key top-k path, float64 the stable sorts.
    rng = np.random.default_rng(7)
    n, d, b = 400, 6, 12
    m = torch.from_numpy(rng.integers(-2, 3, size=(n, d)) / 4.0)
    x = torch.from_numpy(rng.integers(-2, 3, size=(b, d)) / 4.0)
    x[0] = 0.0
    x[1] = -0.0  # every z is -0.0 or 0.0 for this row: ties all the way
    rows = torch.tensor(rng.choice(n, size=b, replace=False))
    indptr, indices = mined_positives(rng, rows, n, 5)
    ref, h_ref = hard_negatives(x, tensor_blocks(m, block_rows), indptr, indices, rows, r, count=n)
    got, h_got = hard_negatives(x.float(), tensor_blocks(m.float(), block_rows), indptr, indices, rows, r, count=n)
    assert torch.equal(got, ref) and torch.equal(h_got, h_ref)
    assert int(h_ref.min()) > 0 and (ref[1][ref[1] >= 0] == ref[1][ref[1] >= 0].sort().values).all()


def test_order_keys_round_trip_and_order():
    values = torch.tensor([0.5, -0.0, 0.0, -1.5, float("inf"), -float("inf"), 1e-30, -1e-30], dtype=torch.float32)
    idx = torch.tensor([3, 9, 1, 0, 2**32 - 1, 7, 5, 6])
    keys = order_keys(values, idx)
    back_v, back_i = keys_to_rows(keys)
    assert torch.equal(back_i, idx) and torch.equal(back_v, values + 0.0)
    order = torch.argsort(keys, descending=True).tolist()
    assert [int(idx[k]) for k in order] == [2**32 - 1, 3, 5, 1, 9, 6, 0, 7]  # +0.0 and -0.0 tie: row 1 first


def test_float32_nan_in_the_dictionary_is_reported():
    m = F.normalize(torch.randn(50, 4), dim=1)
    m[17] = -float("nan")
    rows = torch.tensor([0, 1])
    with pytest.raises(ConfigError, match="NaN"):
        hard_negatives(m[:2].clone(), tensor_blocks(m, 16), *self_positives(rows), rows, 0.1, count=50)


def test_duplicate_dictionary_rows_and_no_hard_negatives():
    rng = np.random.default_rng(4)
    base = normalised(rng, 20, 8)
    m = torch.cat([base, base, base[:5]])  # every row has an exact duplicate
    x = normalised(rng, 4, 8)
    rows = torch.tensor([0, 21, 40, 7])
    for r, expect in [(0.0, 0), (0.01, 0), (0.05, 2)]:  # 44 negatives: floor(0.44) = 0, floor(2.2) = 2
        dense, g_dense, stream, g_stream = both(x, m, rows, *self_positives(rows), r, 0.4, 7)
        assert dense["hard"].shape == (4, expect)
        torch.testing.assert_close(stream["loss"], dense["loss"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g_stream, g_dense, rtol=1e-12, atol=1e-14)
        if expect == 0:
            assert dense["negative"].item() == 0.0
            torch.testing.assert_close(dense["loss"], ((1 - (x * m[rows]).sum(1)) ** 2).mean(), rtol=1e-12, atol=0)


def test_positives_larger_than_the_dictionary_share():
    # |P_b| = N - 1: only one negative left, floor(r * 1) = 0
    rng = np.random.default_rng(5)
    m, x = normalised(rng, 12, 6), normalised(rng, 2, 6)
    rows = torch.tensor([0, 5])
    indptr, indices = csr([np.arange(11), np.arange(12)])
    dense, g_dense, stream, g_stream = both(x, m, rows, indptr, indices, 0.5, 0.4, 5)
    assert dense["hard"].shape == (2, 0)
    assert_same(dense, g_dense, stream, g_stream)


@pytest.mark.parametrize(
    ("n", "r", "expected"),
    [(99, 0.01, 0), (100, 0.01, 1), (100, 0.29, 29), (0, 0.01, 0), (277796, 0.01, 2777), (5, 0.0, 0)],
)
def test_hard_negative_count_is_floor(n, r, expected):
    assert hard_negative_counts(torch.tensor([n]), r).tolist() == [expected]


def test_hard_negatives_take_store_blocks_and_other_dtypes():
    rng = np.random.default_rng(6)
    m = normalised(rng, 300, 16)
    x = normalised(rng, 5, 16)
    rows = torch.arange(5)
    blocks = [(s, m[s : s + 64].numpy().astype(np.float16)) for s in range(0, 300, 64)][::-1]  # any order
    hard, counts = hard_negatives(x.float(), blocks, *self_positives(rows), rows, 0.02, count=300)
    assert counts.tolist() == [5] * 5 and hard.shape == (5, 5)
    z = x.float() @ torch.from_numpy(m.numpy().astype(np.float16)).float().T
    z[rows, rows] = -np.inf
    assert torch.equal(hard, torch.sort(z, dim=1, descending=True, stable=True).indices[:, :5])


def test_bad_blocks_and_positives_are_reported():
    m = torch.eye(6, dtype=torch.float64)
    x = m[:2].clone()
    rows = torch.tensor([0, 1])
    with pytest.raises(ConfigError, match="covering rows 0..5"):
        hard_negatives(x, tensor_blocks(m[:4], 2), *self_positives(rows), rows, 0.5, count=6)
    with pytest.raises(ConfigError, match="covering rows 0..5"):
        hard_negatives(x, [(0, m), (2, m[2:3])], *self_positives(rows), rows, 0.5, count=6)
    with pytest.raises(ConfigError, match="own row"):
        dtl_dense(x, m, rows, *csr([np.array([1]), np.array([1])]), 0.5, 0.4)
    with pytest.raises(ConfigError, match="unique"):
        dtl_dense(x, m, rows, *csr([np.array([0, 0]), np.array([1])]), 0.5, 0.4)
    with pytest.raises(ConfigError, match="0..5"):
        dtl_dense(x, m, rows, *csr([np.array([0, 9]), np.array([1])]), 0.5, 0.4)
    with pytest.raises(ConfigError, match="NaN"):
        hard_negatives(torch.full_like(x, torch.nan), tensor_blocks(m, 2), *self_positives(rows), rows, 0.5, count=6)
    with pytest.raises(ConfigError, match="ratio"):
        dtl_dense(x, m, rows, *self_positives(rows), 1.5, 0.4)


def test_batch_positives_cut_the_store_csr():
    indptr = np.array([0, 2, 3, 6, 7])
    indices = np.array([0, 2, 1, 2, 0, 3, 3])
    b_ptr, b_idx = batch_positives(indptr, indices, torch.tensor([2, 0, 2]))
    assert b_ptr.tolist() == [0, 3, 5, 8]
    assert b_idx.tolist() == [2, 0, 3, 0, 2, 2, 0, 3]
    with pytest.raises(ConfigError, match="another dictionary"):
        batch_positives(indptr, indices, torch.tensor([4]))


class _CountingArray:
    """A numpy array that only supports indexing, and counts the elements each step reads."""

    def __init__(self, a: np.ndarray):
        self.a, self.read = a, 0

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, at):
        out = self.a[at]
        self.read += np.size(out)
        return out


def test_batch_positives_read_only_the_batch_rows_of_a_large_csr():
    """A step's cost is O(B + its positives), not O(N): only those CSR entries are read (torch or numpy CSR)."""
    n, rng = 200_000, np.random.default_rng(0)
    counts = rng.integers(1, 4, n)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    indices = rng.integers(0, n, int(indptr[-1]))
    rows = torch.from_numpy(rng.choice(n, 64, replace=False))
    lazy_ptr, lazy_idx = _CountingArray(indptr), _CountingArray(indices)
    b_ptr, b_idx = batch_positives(lazy_ptr, lazy_idx, rows)
    ref_ptr, ref_idx = batch_positives(torch.from_numpy(indptr), torch.from_numpy(indices), rows)
    assert torch.equal(b_ptr, ref_ptr) and torch.equal(b_idx, ref_idx)
    assert lazy_ptr.read == 2 * len(rows) and lazy_idx.read == int(counts[rows.numpy()].sum())


def test_gathered_dot_gradient_with_repeated_pairs():
    rng = np.random.default_rng(7)
    m, x = normalised(rng, 10, 4), normalised(rng, 3, 4).requires_grad_(True)
    pairs_b, pairs_j = torch.tensor([0, 0, 2, 1, 0]), torch.tensor([3, 3, 9, 0, 1])
    z = gathered_dot(x, pairs_b, pairs_j, tensor_rows(m), chunk_rows=2)
    torch.testing.assert_close(z, (x[pairs_b] * m[pairs_j]).sum(1), rtol=1e-14, atol=0)
    assert torch.autograd.gradcheck(lambda v: gathered_dot(v, pairs_b, pairs_j, tensor_rows(m), 2), (x,))


def test_dtl_loss_with_no_negatives_is_the_positive_term():
    m = torch.eye(3, dtype=torch.float64)
    x = torch.tensor([[0.6, 0.8, 0.0]], dtype=torch.float64)
    out = dtl_loss(x, tensor_rows(m), [0], *self_positives([0]), torch.full((1, 0), -1), 0.4)
    assert out["loss"].item() == pytest.approx(0.4**2)


def test_momentum_update_normalises_the_sum():
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    x = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    new = momentum_update(m, x)
    assert not new.requires_grad
    s = 2**-0.5
    torch.testing.assert_close(new, torch.tensor([[s, s], [0.0, 1.0]], dtype=torch.float64), rtol=1e-15, atol=0)


def test_momentum_update_repeated_rows_apply_in_batch_order():
    rng = np.random.default_rng(8)
    dictionary = normalised(rng, 6, 3)
    x = normalised(rng, 5, 3)
    rows = torch.tensor([4, 1, 4, 0, 4])
    new = momentum_update(dictionary[rows], x, rows)
    expected = dictionary.clone()
    for b, y in enumerate(rows.tolist()):
        expected[y] = F.normalize(expected[y] + x[b], dim=0)
    torch.testing.assert_close(new, expected[rows], rtol=1e-14, atol=0)
    written = dictionary.clone()
    written[rows] = new
    torch.testing.assert_close(written, expected, rtol=1e-14, atol=0)
    assert not torch.allclose(new[0], F.normalize(dictionary[4] + x[0], dim=0))


# --------------------------------------------------------------------------- graph candidates


def graph_of(rng, n: int, rows: torch.Tensor, k: int) -> torch.Tensor:
    """A (B, K) graph row per batch element: the element's own row first, then K-1 other rows in random order."""
    out = [np.concatenate([[y], rng.permutation(np.setdiff1d(np.arange(n), [y]))[: k - 1]]) for y in rows.tolist()]
    return torch.tensor(np.array(out))


def dense_graph_reference(x, m, rows, indptr, indices, cand, r):
    """Dense z, then the (z desc, row asc) top min(h, |C|) among the candidates minus the positives."""
    z = (x @ m.T).numpy()
    out = []
    for e in range(len(x)):
        pos = indices[indptr[e] : indptr[e + 1]].numpy()
        h = int(np.floor(r * (len(m) - len(pos)) + 1e-9))
        c = np.setdiff1d(np.unique(cand[e].numpy()), np.concatenate([pos, [-1]]))  # ascending
        out.append(c[np.argsort(-z[e, c], kind="stable")][:h].tolist())
    return out


def rows_of(hard: torch.Tensor) -> list[list[int]]:
    return [row[row >= 0].tolist() for row in hard]


@pytest.mark.parametrize(("r", "max_extra"), [(0.01, 0), (0.05, 6), (0.3, 3)])
def test_graph_listing_every_row_is_the_exact_selection(r, max_extra):
    rng = np.random.default_rng(11)
    n, d, b = 250, 16, 9
    m, x = normalised(rng, n, d), normalised(rng, b, d)
    rows = torch.tensor(rng.choice(n, size=b, replace=False))
    indptr, indices = mined_positives(rng, rows, n, max_extra) if max_extra else self_positives(rows)
    cand = graph_of(rng, n, rows, n)  # K = N
    got, taken = graph_negatives(x, cand, tensor_rows(m), indptr, indices, rows, r, count=n, chunk_rows=7)
    exact, h = hard_negatives(x, tensor_blocks(m, 32), indptr, indices, rows, r, count=n)
    assert torch.equal(got, exact) and torch.equal(taken, h)
    assert torch.equal(got, dtl_dense(x, m, rows, indptr, indices, r, 0.4)["hard"])


@pytest.mark.parametrize("k", [4, 12, 40])
@pytest.mark.parametrize(("r", "max_extra"), [(0.05, 0), (0.1, 6), (0.3, 3)])
def test_graph_selection_is_the_dense_selection_over_the_candidates(k, r, max_extra):
    rng = np.random.default_rng(12)
    n, d, b = 200, 8, 10
    m, x = normalised(rng, n, d), normalised(rng, b, d)
    rows = torch.tensor(rng.choice(n, size=b, replace=False))
    indptr, indices = mined_positives(rng, rows, n, max_extra) if max_extra else self_positives(rows)
    cand = graph_of(rng, n, rows, k)
    cand[0, -1] = -1  # padding and a repeated row are not candidates
    cand[1, -1] = cand[1, 1]
    got, taken = graph_negatives(x, cand, tensor_rows(m), indptr, indices, rows, r, count=n, chunk_rows=5)
    expected = dense_graph_reference(x, m, rows, indptr, indices, cand, r)
    assert rows_of(got) == expected
    assert taken.tolist() == [len(e) for e in expected] and got.shape[1] == max(map(len, expected))


def test_graph_selection_loss_and_gradient_equal_a_dense_computation():
    rng = np.random.default_rng(13)
    n, d, b, r, delta = 120, 8, 6, 0.2, 0.4
    m, x0 = normalised(rng, n, d), normalised(rng, b, d)
    rows = torch.tensor(rng.choice(n, size=b, replace=False))
    indptr, indices = mined_positives(rng, rows, n, 4)
    hard, _ = graph_negatives(x0, graph_of(rng, n, rows, 15), tensor_rows(m), indptr, indices, rows, r, count=n)
    out, g = grad_of(lambda v: dtl_loss(v, tensor_rows(m), rows, indptr, indices, hard, delta, chunk_rows=4), x0)

    def dense(v):
        z = v @ m.T
        terms = []
        for e, neg in enumerate(rows_of(hard)):
            pos = indices[indptr[e] : indptr[e + 1]]
            negative = ((1 + z[e, neg]) ** 2).mean() if neg else z.new_zeros(())
            terms.append(((1 - z[e, pos]) ** 2).mean() + delta * negative)
        return {"loss": torch.stack(terms).mean()}

    ref, g_ref = grad_of(dense, x0)
    assert int((hard >= 0).sum()) > b  # negatives were selected
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)


def test_graph_with_only_positives_or_of_another_dictionary_is_refused():
    rng = np.random.default_rng(14)
    n, d = 50, 4
    m, x = normalised(rng, n, d), normalised(rng, 2, d)
    rows = torch.tensor([3, 7])
    indptr, indices = csr([np.array([3, 8]), np.array([7])])
    with pytest.raises(ConfigError, match=r"row 3, found none among its 2 neighbours; raise mining.k"):
        graph_negatives(x, torch.tensor([[3, 8], [7, 1]]), tensor_rows(m), indptr, indices, rows, 0.1, count=n)
    with pytest.raises(ConfigError, match="another dictionary"):
        graph_negatives(x, torch.tensor([[3, 50], [7, 1]]), tensor_rows(m), indptr, indices, rows, 0.1, count=n)
    # r = 0: no element wants a negative, so an empty candidate set is fine
    hard, taken = graph_negatives(
        x, torch.tensor([[3, 8], [7, 1]]), tensor_rows(m), indptr, indices, rows, 0.0, count=n
    )
    assert hard.shape == (2, 0) and taken.tolist() == [0, 0]
