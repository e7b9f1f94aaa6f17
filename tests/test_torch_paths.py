"""The PyTorch paths' own machinery against the oracles: the blocked attention and the budget-chunked indexer
with one block per chunk (a memory budget of one element) as well as the default budget, on plain, document and
halo'd (sequence-parallel) ranges, outputs and gradients; causality across chunks; the fast top-k's tie rule."""

import pytest
import torch

import dsv4.ops.indexer.torch_chunked as indexer_chunks
import dsv4.ops.v4_attention.torch_chunked as attention_chunks
from dsv4.ops.indexer import indexer_kl_loss, indexer_topk
from dsv4.ops.indexer.naive import topk_recent_first
from dsv4.ops.indexer.topk import topk_recent_first_fast
from dsv4.ops.ranges import AttentionRanges, causal_ranges, document_ranges, group_starts
from dsv4.ops.v4_attention import v4_attention

DOC_LENGTHS = ([37, 1, 50, 4, 41], [5, 60, 2, 66])  # per batch row, 133 tokens; a 1-token document


@pytest.fixture(params=["one_block_per_chunk", "default_budget"])
def budget(request, monkeypatch):
    if request.param == "one_block_per_chunk":
        monkeypatch.setattr(attention_chunks, "CHUNK_ELEMENTS", 1)
        monkeypatch.setattr(indexer_chunks, "CHUNK_ELEMENTS", 1)
    return request.param


def make_ranges(kind: str, batch: int, seq_len: int, window: int, ratio: int):
    """-> (ranges, number of raw K=V rows, number of compressed entries)."""
    if kind == "plain":
        return causal_ranges(batch, seq_len, window, ratio, "cpu"), seq_len, seq_len // ratio if ratio else 0
    if kind == "documents":
        rows = DOC_LENGTHS if seq_len == 133 else ([seq_len], [seq_len // 2, seq_len - seq_len // 2])
        positions = torch.stack([torch.cat([torch.arange(n) for n in rows[b % 2]]) for b in range(batch)])
        starts = group_starts(positions, ratio) if ratio else None
        n_entries = 0 if starts is None else starts.shape[1]
        return document_ranges(positions, window, ratio, starts), seq_len, n_entries
    # halo'd: the K=V rows start with window - 1 rows of a previous shard, as under sequence parallelism
    halo = window - 1
    t = torch.arange(seq_len)[None].expand(batch, -1) + halo
    plain = causal_ranges(batch, seq_len, window, ratio, "cpu")
    ranges = AttentionRanges((t - window + 1).int(), t.int(), plain.cmp_lo, plain.cmp_hi)
    return ranges, seq_len + halo, seq_len // ratio if ratio else 0


def assert_close(a, b, what, tol=3e-5):
    scale = b.abs().max().clamp_min(1.0)
    err = (a - b).abs().max()
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} (scale {scale:.3e})"


@pytest.mark.parametrize("mode", ["window", "dense", "sparse"])
@pytest.mark.parametrize("ranges_kind", ["plain", "documents", "halo"])
@pytest.mark.parametrize("seq_len,n_heads", [(3, 1), (5, 3), (129, 3), (133, 4)])
def test_attention_matches_oracle(budget, mode, ranges_kind, seq_len, n_heads):
    torch.manual_seed(seq_len * 10 + n_heads)
    batch, dim, window, ratio, k = 2, 12, 9, 4, 5
    ranges, n_rows, n_entries = make_ranges(ranges_kind, batch, seq_len, window, 0 if mode == "window" else ratio)
    q = torch.randn(batch, seq_len, n_heads, dim, requires_grad=True)
    kv = torch.randn(batch, n_rows, dim, requires_grad=True)
    sink = torch.randn(n_heads, requires_grad=True)
    cmp = picks = None
    inputs = [q, kv, sink]
    if mode != "window" and n_entries:
        cmp = torch.randn(batch, n_entries, dim, requires_grad=True)
        inputs.append(cmp)
    if mode == "sparse" and cmp is not None:  # distinct random picks among each query's visible entries, -1 holes
        entry = torch.arange(n_entries)
        visible = (entry >= ranges.cmp_lo[..., None]) & (entry < ranges.cmp_hi[..., None])
        draw, picks = torch.where(visible, torch.rand(batch, seq_len, n_entries), -1.0).topk(min(k, n_entries))
        picks = torch.where((draw >= 0) & (torch.rand(picks.shape) < 0.8), picks, -1)
    results = []
    for backend in ("naive", "torch"):
        out, lse = v4_attention(q, kv, sink, window, dim ** -0.5, compressed_kv=cmp, ratio=ratio, topk_idx=picks,
                                backend=backend, ranges=ranges)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, dim)).sum(), inputs)
        results.append((out, lse, grads))
    (o1, l1, g1), (o2, l2, g2) = results
    assert_close(o2, o1, "output")
    assert_close(l2, l1, "lse")
    for name, a, b in zip(("dq", "dkv", "dsink", "dcompressed"), g2, g1):
        assert_close(a, b, name)


@pytest.mark.parametrize("mode", ["window", "dense", "sparse"])
def test_attention_is_causal_across_chunks(budget, mode):
    """Changing the rows and entries after query t (and t's later picks) leaves outputs <= t unchanged, exactly."""
    torch.manual_seed(1)
    seq_len, n_heads, dim, window, ratio = 140, 2, 8, 9, 4
    q, kv = torch.randn(1, seq_len, n_heads, dim), torch.randn(1, seq_len, dim)
    sink = torch.randn(n_heads)
    cmp = None if mode == "window" else torch.randn(1, seq_len // ratio, dim)
    picks = None
    if mode == "sparse":
        visible = ((torch.arange(seq_len) + 1) // ratio).clamp(min=1)[None, :, None]
        picks = (torch.rand(1, seq_len, 3) * visible).long()
        picks[:, : ratio - 1] = -1
    base, _ = v4_attention(q, kv, sink, window, 0.3, compressed_kv=cmp, ratio=ratio, topk_idx=picks)
    for t in (0, 3, 31, 32, 63, 100):
        kv2 = kv.clone()
        kv2[:, t + 1:] += 1.0
        cmp2 = None
        if cmp is not None:
            cmp2 = cmp.clone()
            cmp2[:, (t + 1) // ratio:] += 1.0
        moved, _ = v4_attention(q, kv2, sink, window, 0.3, compressed_kv=cmp2, ratio=ratio, topk_idx=picks)
        assert torch.equal(moved[:, : t + 1], base[:, : t + 1]), f"the future reached query <= {t}"
        assert not torch.equal(moved[:, t + 1:], base[:, t + 1:])


def tie_heavy_scores(rows: int, n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, n, generator=gen)
    if kind == "relu":  # exact zeros, of both signs (w * relu(.) with w < 0 gives -0.0)
        x = x.relu() * torch.where(torch.rand(rows, n, generator=gen) < 0.5, -1.0, 1.0)
    elif kind == "coarse":
        x = (x * 2).round()
    elif kind == "masked":  # fewer visible entries than k in some rows
        x[torch.rand(rows, n, generator=gen) < 0.7] = float("-inf")
    return x


@pytest.mark.parametrize("n", [1, 3, 4, 5, 17, 127, 128, 129, 1000, 2051])
@pytest.mark.parametrize("kind", ["distinct", "relu", "coarse", "masked"])
def test_fast_topk_equals_the_oracle_bit_for_bit(n, kind):
    gen = torch.Generator().manual_seed(n)
    scores = tie_heavy_scores(9, n, kind, gen)
    for k in sorted({k for k in (1, 2, 3, 16, n // 2, n - 1, n) if 1 <= k <= n}):  # n >= 16 k: pruned rows
        want_values, want_idx = topk_recent_first(scores, k)
        values, idx = topk_recent_first_fast(scores, k)
        assert torch.equal(idx, want_idx), (k, scores, idx, want_idx)
        assert torch.equal(values, want_values)


@pytest.mark.parametrize("ranges_kind", ["plain", "documents"])
@pytest.mark.parametrize("seq_len", [5, 129, 133])
def test_indexer_matches_oracle(budget, ranges_kind, seq_len):
    """Top-k (indices and their order) and both KL losses with their gradients."""
    gen = torch.Generator().manual_seed(seq_len)
    batch, n_index_heads, width, n_heads, dim, ratio, topk = 2, 3, 8, 2, 6, 4, 4
    ranges, _, n_entries = make_ranges(ranges_kind, batch, seq_len, 7, ratio)
    index_q = torch.randn(batch, seq_len, n_index_heads, width, generator=gen).requires_grad_()
    index_k = torch.randn(batch, n_entries, width, generator=gen).requires_grad_()
    weights = torch.randn(batch, seq_len, n_index_heads, generator=gen)
    weights[:, ::3] = -weights[:, ::3].abs()  # all heads negative: scores <= 0, ties at exactly 0
    weights.requires_grad_()
    q = torch.randn(batch, seq_len, n_heads, dim, generator=gen)
    cmp = torch.randn(batch, n_entries, dim, generator=gen)
    lse = torch.logsumexp(torch.randn(batch, seq_len, n_heads, 9, generator=gen), -1) + 1.0
    picks = indexer_topk(index_q, index_k, weights, ratio, topk, backend="naive", ranges=ranges)
    got = indexer_topk(index_q, index_k, weights, ratio, topk, backend="torch", ranges=ranges)
    assert torch.equal(got, picks)
    for sparse in (None, picks):
        losses, grads = [], []
        for backend in ("naive", "torch"):
            loss = indexer_kl_loss(q, cmp, lse, index_q, index_k, weights, ratio, dim ** -0.5, topk_idx=sparse,
                                   backend=backend, ranges=ranges)
            losses.append(loss)
            grads.append(torch.autograd.grad(loss, (index_q, index_k, weights), allow_unused=True))
        assert_close(losses[1], losses[0], "loss", tol=1e-5)
        for a, b in zip(*grads):
            if b is not None:
                assert_close(a, b, "grad", tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_lse_without_sink_mass_and_bf16(dtype):
    """A sink far below every logit (its probability underflows: the log-sum-exp falls back to the largest
    logit) and bf16 inputs (computed in fp32 inside, returned in bf16) still match the oracle."""
    torch.manual_seed(3)
    seq_len, n_heads, dim = 70, 3, 16
    q = (torch.randn(1, seq_len, n_heads, dim) * 3).to(dtype).requires_grad_()
    kv = torch.randn(1, seq_len, dim).to(dtype).requires_grad_()
    sink = torch.tensor([-200.0, 0.0, 1.0], requires_grad=True)
    cmp = torch.randn(1, seq_len // 4, dim).to(dtype).requires_grad_()
    results = []
    for backend in ("naive", "torch"):
        out, lse = v4_attention(q, kv, sink, 9, 0.5, compressed_kv=cmp, ratio=4, backend=backend)
        assert out.dtype == dtype
        results.append((out.float(), lse, torch.autograd.grad(out.float().sum(), (q, kv, sink, cmp))))
    tol = 3e-5 if dtype == torch.float32 else 2e-2
    assert_close(results[1][0], results[0][0], "output", tol)
    assert_close(results[1][1], results[0][1], "lse", tol)
    for a, b in zip(results[1][2], results[0][2]):
        assert_close(a.float(), b.float(), "grad", tol)
