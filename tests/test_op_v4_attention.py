"""The V4 attention op (dsv4.ops.v4_attention) against its full-mask oracle, every backend: outputs, lse and every
gradient. The PyTorch path (blocked, with one block per chunk as well as the default budget) on plain, document and
halo'd (sequence-parallel) ranges, causality across chunks, picks that stay with their query, the sink. The Triton
kernels under TRITON_INTERPRET=1 on CPU (tiny shapes): odd lengths and head counts, fp32 and fp16, both dK=V
paths, every output element written, torch.compile."""

import pytest
import torch
from op_helpers import assert_close, make_ranges  # noqa: E402

import dsv4.ops.triton_common as triton_common
import dsv4.ops.v4_attention.torch_chunked as attention_chunks
import dsv4.ops.v4_attention.triton as triton_kernels
from dsv4.ops.ranges import document_ranges, group_starts
from dsv4.ops.v4_attention import v4_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1 (conftest)




@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Triton kernel outputs start as NaN: any element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(triton_common, "POISON_OUTPUTS", True)


@pytest.fixture(params=["one_block_per_chunk", "default_budget"])
def budget(request, monkeypatch):
    if request.param == "one_block_per_chunk":
        monkeypatch.setattr(attention_chunks, "CHUNK_ELEMENTS", 1)
    return request.param


# ------------------------------------------------------------------ PyTorch path and op semantics


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


@pytest.mark.parametrize("seq_len", [5, 129])
@pytest.mark.parametrize("n_heads", [1, 3, 4])
def test_op_with_arbitrary_picks_matches_oracle(seq_len, n_heads):
    """The core op alone, fed random per-query picks (with -1 holes): no query sees another's picks."""
    torch.manual_seed(seq_len + n_heads)
    dim, n_entries, k = 12, 40, 6
    q = torch.randn(2, seq_len, n_heads, dim, requires_grad=True)
    kv = torch.randn(2, seq_len, dim, requires_grad=True)
    cmp = torch.randn(2, n_entries, dim, requires_grad=True)
    sink = torch.randn(n_heads, requires_grad=True)
    picks = torch.stack([torch.randperm(n_entries)[:k] for _ in range(2 * seq_len)]).view(2, seq_len, k)
    picks[torch.rand(picks.shape) < 0.3] = -1
    results = []
    for backend in ("naive", "torch"):
        out, lse = v4_attention(q, kv, sink, 5, dim ** -0.5, compressed_kv=cmp, topk_idx=picks, backend=backend,
                                chunk_size=7)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, dim)).sum(), (q, kv, cmp, sink))
        results.append((out, lse, grads))
    (o1, l1, g1), (o2, l2, g2) = results
    assert_close(o2, o1, "output", tol=4e-5)
    assert_close(l2, l1, "lse", tol=4e-5)
    for name, a, b in zip(("dq", "dkv", "dcompressed", "dsink"), g2, g1):
        assert_close(a, b, name, tol=4e-5)


def test_picks_do_not_leak_between_queries():
    """A compressed entry picked only by query 7 must not change any other query's output."""
    torch.manual_seed(0)
    q, kv = torch.randn(1, 10, 2, 8), torch.randn(1, 10, 8)
    cmp, sink = torch.randn(1, 4, 8), torch.zeros(2)
    picks = torch.full((1, 10, 2), -1)
    picks[0, 7, 0] = 3
    base, _ = v4_attention(q, kv, sink, 3, 0.35, compressed_kv=cmp, topk_idx=picks)
    cmp2 = cmp.clone()
    cmp2[0, 3] += 5.0
    moved, _ = v4_attention(q, kv, sink, 3, 0.35, compressed_kv=cmp2, topk_idx=picks)
    changed = (moved - base).abs().amax(dim=(0, 2, 3)) > 1e-6
    assert changed.tolist() == [t == 7 for t in range(10)]


def test_sink_takes_mass_and_window_is_exact():
    """With a huge sink, outputs vanish; with a very negative sink and window 1, output = the token's own row."""
    q, kv = torch.randn(1, 6, 2, 4), torch.randn(1, 6, 4)
    out, _ = v4_attention(q, kv, torch.full((2,), 50.0), 1, 0.5)
    assert out.abs().max() < 1e-12
    out, _ = v4_attention(q, kv, torch.full((2,), -50.0), 1, 0.5)
    assert torch.allclose(out, kv[:, :, None, :].expand_as(out), atol=1e-6)


# ------------------------------------------------------------------ Triton kernels (interpreter on CPU)


def make_inputs(batch, seq_len, heads, dim, n_entries, k, mode, dtype, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()

    q, kv, sink = rand(batch, seq_len, heads, dim), rand(batch, seq_len, dim), rand(heads)
    cmp = rand(batch, n_entries, dim) if mode != "window" else None
    picks = None
    if mode == "sparse":
        picks = torch.stack([torch.randperm(n_entries, generator=gen)[:k] for _ in range(batch * seq_len)])
        picks = picks.view(batch, seq_len, k)
        picks[torch.rand(picks.shape, generator=gen) < 0.25] = -1
        picks = picks.to(DEVICE)
    return q, kv, sink, cmp, picks


def compare(seq_len, heads, mode, dtype, deterministic, dim=16, window=5, ratio=4, k=3, seed=0, ranges=None,
            n_entries=None):
    n_entries = n_entries or max(seq_len // ratio, k if mode == "sparse" else 1)
    q, kv, sink, cmp, picks = make_inputs(2, seq_len, heads, dim, n_entries, k, mode, dtype, seed)
    wrt = [q, kv, sink] + ([cmp] if cmp is not None else [])
    out_grad = torch.randn(2, seq_len, heads, dim, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    results = []
    for backend in ("naive", "triton"):
        out, lse = v4_attention(q, kv, sink, window, dim ** -0.5, compressed_kv=cmp, ratio=ratio, topk_idx=picks,
                                backend=backend, deterministic=deterministic, ranges=ranges)
        grads = torch.autograd.grad((out.float() * out_grad.float()).sum(), wrt)
        results.append((out, lse, grads))
    (o_ref, l_ref, g_ref), (o, lse, g) = results
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for name, a, b in [("out", o, o_ref), ("lse", lse, l_ref)] + [
            (n, x, y) for n, x, y in zip(("dq", "dkv", "dsink", "dcompressed"), g, g_ref)]:
        assert a.dtype == b.dtype, name
        assert not torch.isnan(a).any(), f"{name}: unwritten (NaN) elements"
        scale = b.float().abs().max().clamp_min(1.0)
        err = (a.float() - b.float()).abs().max()
        assert err <= tol * scale, f"{name}: max err {err:.3e} (scale {scale:.2e})"


@pytest.mark.parametrize("mode", ["window", "dense", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("seq_len", [3, 5, 17])
def test_kernels_match_oracle_small(mode, dtype, deterministic, seq_len):
    compare(seq_len, heads=3, mode=mode, dtype=dtype, deterministic=deterministic, seed=seq_len)


@pytest.mark.parametrize("heads", [1, 17])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_kernels_head_counts(heads, mode):
    """17 heads spans two head blocks of 16; 1 head pads 15 rows."""
    compare(9, heads=heads, mode=mode, dtype=torch.float32, deterministic=True, seed=heads)


@pytest.mark.slow
@pytest.mark.parametrize("seq_len", [127, 129])
@pytest.mark.parametrize("mode", ["window", "dense", "sparse"])
def test_kernels_match_oracle_block_edges(seq_len, mode):
    """Lengths just off the block sizes and the ratio; non-power-of-two head_dim (24) pads the D block."""
    compare(seq_len, heads=2, mode=mode, dtype=torch.float32, deterministic=True, dim=24, window=9, k=4,
            seed=seq_len)


@pytest.mark.parametrize("mode", ["window", "dense", "sparse"])
@pytest.mark.parametrize("deterministic", [True, False])
def test_kernels_with_document_ranges(mode, deterministic):
    """Packed documents: per-query ranges that stop at document starts (window and dense entries)."""
    positions = torch.cat([torch.arange(n) for n in (5, 1, 9, 7, 10)])[None].expand(2, -1).to(DEVICE)
    starts = group_starts(positions, 4)
    ranges = document_ranges(positions, 4, 4, starts)
    compare(positions.shape[1], heads=3, mode=mode, dtype=torch.float32, deterministic=deterministic, window=4,
            ranges=ranges, n_entries=starts.shape[1], seed=3)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_deterministic_dkv_split_into_segments_and_chunks(mode, monkeypatch):
    """Long sequences split the fixed-order dK=V work: dense entries' readers into query segments (partial
    sums added in segment order), sparse picks into query chunks that fit the buffer. Force both splits."""
    monkeypatch.setattr(triton_kernels, "DK_SEGMENT_QUERIES", 4)  # dense: 3 segments (the buffer caps 6)
    monkeypatch.setattr(triton_kernels, "DK_BUFFER_BYTES", 5 * 2 * 3 * 16 * 4)  # sparse: 5 queries per chunk
    compare(23, heads=3, mode=mode, dtype=torch.float32, deterministic=True, seed=23)


def test_deterministic_dkv_is_bitwise_repeatable():
    q, kv, sink, cmp, picks = make_inputs(1, 11, 2, 16, 4, 3, "sparse", torch.float32, seed=5)
    grads = []
    for _ in range(2):
        out, _ = v4_attention(q, kv, sink, 4, 0.25, compressed_kv=cmp, ratio=2, topk_idx=picks, backend="triton")
        grads.append(torch.autograd.grad(out.sum(), (kv, cmp)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_custom_op_works_under_torch_compile():
    """Inductor compiles the graph around the custom op (C++ on CPU): output and every gradient equal eager's."""
    q, kv, sink, cmp, _ = make_inputs(1, 7, 2, 16, 3, 2, "dense", torch.float32, seed=9)

    def f(q, kv, sink, cmp):
        out = v4_attention(q, kv, sink, 3, 0.25, compressed_kv=cmp, ratio=2, backend="triton")[0]
        return (out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum()

    inputs = (q, kv, sink, cmp)
    eager = f(*inputs)
    eager_grads = torch.autograd.grad(eager, inputs)
    compiled = torch.compile(f, fullgraph=True, backend="inductor")(*inputs)
    grads = torch.autograd.grad(compiled, inputs)
    assert torch.allclose(eager, compiled, atol=1e-5)
    for name, a, b in zip(("q", "kv", "sink", "compressed_kv"), eager_grads, grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), f"d{name}: {(a - b).abs().max():.2e}"


def test_triton_backend_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, kv, sink = torch.randn(1, 3, 1, 16), torch.randn(1, 3, 16), torch.zeros(1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        v4_attention(q, kv, sink, 2, 0.25, backend="triton")
