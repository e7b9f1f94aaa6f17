"""Triton V4 attention kernels against the full-mask oracle, under TRITON_INTERPRET=1 on CPU (tiny shapes):
outputs, lse and every gradient; odd lengths and head counts; fp32 and fp16; both dK=V paths; every output
element written; the whole model on the Triton backend equals the PyTorch backend and trains."""

import copy

import pytest
import torch

import dsv4.ops.v4_attention.triton as triton_kernels
from dsv4 import build_model
from dsv4.ops.ranges import document_ranges, group_starts
from dsv4.ops.v4_attention import v4_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1 (conftest)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN: any element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(triton_kernels, "POISON_OUTPUTS", True)


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


TINY = dict(vocab_size=61, hidden_size=32, num_hidden_layers=4, intermediate_size=48, num_attention_heads=2,
            head_dim=16, qk_rope_head_dim=8, q_lora_rank=16, o_groups=2, o_lora_rank=8, sliding_window=6,
            compress_ratios=[0, 4, 8, -1], index_n_heads=2, index_head_dim=8, index_topk=3, num_key_value_heads=1)


@pytest.mark.parametrize("phase", ["indexer_warmup", "sparse"])
def test_model_triton_backend_matches_torch_backend(phase):
    torch.manual_seed(0)
    ref = build_model(TINY, backend="torch", phase=phase).to(DEVICE)
    tri = copy.deepcopy(ref)
    tri.set_attention_options(backend="triton")
    ids = torch.randint(0, 61, (2, 37), device=DEVICE)
    outs = []
    for model in (ref, tri):
        out = model(ids, labels=ids)
        (out.lm_loss + out.indexer_loss).backward()
        outs.append((out.lm_loss.detach(), out.indexer_loss.detach(),
                     {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l1, i1, g1), (l2, i2, g2) = outs
    assert torch.allclose(l1, l2, atol=1e-5) and torch.allclose(i1, i2, atol=1e-6)
    assert set(g1) == set(g2)
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-5, rtol=1e-4), name


def test_model_triton_backend_with_documents_matches_torch_backend():
    torch.manual_seed(2)
    ref = build_model(TINY, backend="torch", phase="sparse").to(DEVICE)
    tri = copy.deepcopy(ref)
    tri.set_attention_options(backend="triton")
    ids = torch.randint(0, 61, (2, 30), device=DEVICE)
    positions = torch.cat([torch.arange(n) for n in (9, 4, 17)])[None].expand(2, -1).to(DEVICE)
    outs = []
    for model in (ref, tri):
        out = model(ids, labels=ids, positions=positions)
        (out.lm_loss + out.indexer_loss).backward()
        outs.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    for name in outs[0][1]:
        assert torch.allclose(outs[0][1][name], outs[1][1][name], atol=1e-5, rtol=1e-4), name


def test_model_trains_a_few_steps_on_the_triton_backend():
    torch.manual_seed(1)
    model = build_model(TINY, backend="triton", phase="sparse").to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 61, (2, 24), device=DEVICE)
    losses = []
    for _ in range(4):
        out = model(ids, labels=ids)
        (out.lm_loss + 0.01 * out.indexer_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_triton_backend_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, kv, sink = torch.randn(1, 3, 1, 16), torch.randn(1, 3, 16), torch.zeros(1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        v4_attention(q, kv, sink, 2, 0.25, backend="triton")
