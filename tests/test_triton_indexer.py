"""Triton indexer kernels (chunked scores + causal mask + top-k, dense KL teacher and student with backward)
against the naive indexer, under TRITON_INTERPRET=1 with tiny shapes."""

import pytest
import torch

import dsv4.ops.v4_attention.triton as triton_kernels
from dsv4.ops.indexer import indexer_kl_loss, indexer_topk
from dsv4.ops.indexer.triton import index_scores, pick_scores, teacher_sparse
from dsv4.ops.ranges import causal_ranges

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1 (conftest)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(triton_kernels, "POISON_OUTPUTS", True)


def inputs(seq_len, n_entries, dtype=torch.float32, seed=0, n_heads=3, width=8):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()

    return rand(2, seq_len, n_heads, width), rand(2, n_entries, width), rand(2, seq_len, n_heads)


@pytest.mark.parametrize("seq_len", [3, 5, 127, 129])
def test_topk_matches_naive(seq_len):
    n_entries = seq_len // 4  # 0 at length 3: every query gets an empty pick list
    index_q, index_k, weights = inputs(seq_len, n_entries, seed=seq_len)
    ref = indexer_topk(index_q, index_k, weights, 4, 5, backend="naive")
    got = indexer_topk(index_q, index_k, weights, 4, 5, backend="triton", chunk_size=48)
    assert got.shape == (2, seq_len, min(5, n_entries))
    assert torch.equal(ref.sort(-1).values, got.sort(-1).values)


def test_scores_kernel_masks_and_reduces_heads():
    index_q, index_k, weights = inputs(19, 4, seed=3, n_heads=5, width=12)
    ranges = causal_ranges(2, 19, 1, 4, index_q.device).slice(7, 19)
    got = index_scores(index_q[:, 7:19], index_k, weights[:, 7:19], ranges)
    dots = torch.einsum("bthc,bsc->bths", index_q[:, 7:19].float(), index_k.float()).relu()
    ref = torch.einsum("bth,bths->bts", weights[:, 7:19].float(), dots)
    t = torch.arange(7, 19, device=DEVICE)[:, None]
    visible = torch.arange(4, device=DEVICE)[None, :] < (t + 1) // 4
    assert torch.equal(torch.isinf(got), ~visible[None].expand_as(got))
    assert torch.allclose(got[:, visible], ref[:, visible], atol=1e-5)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seq_len", [5, 45, 129])
def test_kl_loss_and_grads_match_naive(sparse, dtype, seq_len):
    n_entries, n_heads, dim = seq_len // 4, 2, 16
    index_q, index_k, weights = inputs(seq_len, n_entries, dtype=dtype, seed=seq_len)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, seq_len, n_heads, dim, generator=gen).to(DEVICE, dtype)
    cmp = torch.randn(2, n_entries, dim, generator=gen).to(DEVICE, dtype)
    lse = (torch.logsumexp(torch.randn(2, seq_len, n_heads, 12, generator=gen), -1) + 1.0).to(DEVICE)
    picks = indexer_topk(index_q, index_k, weights, 4, 3, backend="naive") if sparse else None
    results = []
    for backend in ("naive", "triton"):
        loss = indexer_kl_loss(q, cmp, lse, index_q, index_k, weights, 4, dim ** -0.5, topk_idx=picks,
                               backend=backend, chunk_size=40)
        results.append((loss, torch.autograd.grad(loss, (index_q, index_k, weights))))
    (l_ref, g_ref), (loss, grads) = results
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(loss, l_ref, atol=tol, rtol=tol)
    for name, a, b in zip(("d index_q", "d index_k", "d weights"), grads, g_ref):
        assert not torch.isnan(a).any(), name
        assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pick_kernels_match_a_gather(dtype):
    """Sparse phase: student scores of each query's picks (with -1 holes and an entry picked by many queries)
    and their gradients, and the teacher, against torch gathers; d index_k is bitwise repeatable."""
    seq_len, n_entries, k = 21, 6, 4
    index_q, index_k, weights = inputs(seq_len, n_entries, dtype=dtype, seed=11, n_heads=17, width=24)
    gen = torch.Generator().manual_seed(2)
    picks = torch.stack([torch.randperm(n_entries, generator=gen)[:k] for _ in range(2 * seq_len)]).view(2, seq_len, k)
    picks[torch.rand(picks.shape, generator=gen) < 0.3] = -1
    picks = picks.to(DEVICE)
    valid, safe = picks >= 0, picks.clamp(min=0)
    batch_ix = torch.arange(2, device=DEVICE)[:, None, None]
    grad = torch.randn(2, seq_len, k, generator=gen).to(DEVICE)
    dots = torch.einsum("bthc,btkc->bthk", index_q.float(), index_k[batch_ix, safe].float()).relu()
    ref = torch.einsum("bth,bthk->btk", weights.float(), dots)
    ref_grads = torch.autograd.grad((ref * grad * valid).sum(), (index_q, index_k, weights))
    got = pick_scores(index_q, index_k, weights, picks)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.equal(torch.isinf(got), ~valid)
    assert torch.allclose(got[valid], ref[valid], atol=tol, rtol=tol)
    runs = [torch.autograd.grad((torch.where(valid, got, 0.0) * grad).sum(), (index_q, index_k, weights),
                                retain_graph=True) for _ in range(2)]
    for name, a, b in zip(("d index_q", "d index_k", "d weights"), runs[0], ref_grads):
        assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol), name
    assert torch.equal(runs[0][1], runs[1][1])

    q = torch.randn(2, seq_len, 3, 16, generator=gen).to(DEVICE, dtype)
    cmp = torch.randn(2, n_entries, 16, generator=gen).to(DEVICE, dtype)
    lse = (torch.logsumexp(torch.randn(2, seq_len, 3, 9, generator=gen), -1) + 1.0).to(DEVICE)
    z = torch.einsum("bthd,btkd->bthk", q.float(), cmp[batch_ix, safe].float()) * 0.25
    target = (torch.exp(z - lse[..., None]) * valid[:, :, None]).mean(2)
    assert torch.allclose(teacher_sparse(q, cmp, lse, picks, 0.25), target, atol=tol, rtol=tol)


def assert_compiled_matches_eager(f, inputs, backend: str) -> None:
    """torch.compile around the custom ops (inductor: C++ around them on CPU): output and every gradient equal
    eager's."""
    eager = f(*inputs)
    eager_grads = torch.autograd.grad(eager, inputs)
    compiled = torch.compile(f, fullgraph=True, backend=backend)(*inputs)
    grads = torch.autograd.grad(compiled, inputs)
    assert torch.allclose(eager, compiled, atol=1e-5)
    for a, b in zip(eager_grads, grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), f"{(a - b).abs().max():.2e}"
        assert a.abs().sum() > 0, "a gradient that is all zero compares nothing"


def test_index_scores_under_torch_compile():
    index_q, index_k, weights = inputs(9, 3, seed=7)

    def f(q, k, w):
        s = index_scores(q, k, w, causal_ranges(q.shape[0], q.shape[1], 1, 2, q.device))
        return torch.where(torch.isfinite(s), s, 0.0).sum()

    assert_compiled_matches_eager(f, (index_q, index_k, weights), "inductor")


def test_pick_kernels_under_torch_compile():
    index_q, index_k, weights = inputs(9, 3, seed=8)
    picks = torch.tensor([[0, 2], [1, -1], [2, 0]], device=DEVICE).repeat(2, 3, 1)

    def f(q, k, w):
        s = pick_scores(q, k, w, picks)
        return torch.where(torch.isfinite(s), s, 0.0).sum()

    # aot_eager: the same graph capture and autograd as inductor, without its ~10 s C++ compile per graph here
    assert_compiled_matches_eager(f, (index_q, index_k, weights), "aot_eager")
