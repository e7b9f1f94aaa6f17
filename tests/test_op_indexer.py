"""The lightning indexer op (dsv4.ops.indexer) against its oracle, every backend: top-k (causal, the recent-first
tie rule, indices and their order) and the KL loss, dense and sparse, with its gradients. The PyTorch path
(budget-chunked, with one block per chunk as well as the default budget) on plain and document ranges; the fast
top-k bit for bit against the rule; the Triton kernels under TRITON_INTERPRET=1 with tiny shapes (scores, teachers,
picks, torch.compile)."""

import pytest
import torch
from op_helpers import assert_close, make_ranges  # noqa: E402

import dsv4.ops.indexer.torch_chunked as indexer_chunks
import dsv4.ops.triton_common as triton_common
from dsv4.ops.indexer import indexer_kl_loss, indexer_topk
from dsv4.ops.indexer.topk import topk_recent_first, topk_recent_first_fast
from dsv4.ops.indexer.triton_op import index_scores, pick_scores, teacher_sparse
from dsv4.ops.ranges import causal_ranges

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1 (conftest)




@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Triton kernel outputs start as NaN: any element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(triton_common, "POISON_OUTPUTS", True)


@pytest.fixture(params=["one_block_per_chunk", "default_budget"])
def budget(request, monkeypatch):
    if request.param == "one_block_per_chunk":
        monkeypatch.setattr(indexer_chunks, "CHUNK_ELEMENTS", 1)
    return request.param


def make_indexer_inputs(seq_len, n_entries, seed=0, batch=2):
    gen = torch.Generator().manual_seed(seed)
    index_q = torch.randn(batch, seq_len, 3, 8, generator=gen)
    index_k = torch.randn(batch, n_entries, 8, generator=gen)
    weights = torch.randn(batch, seq_len, 3, generator=gen)
    return index_q, index_k, weights


# ------------------------------------------------------------------ top-k and loss semantics, PyTorch path


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_indexer_never_selects_future_entries(backend):
    seq_len, ratio, topk = 37, 4, 5
    index_q, index_k, weights = make_indexer_inputs(seq_len, seq_len // ratio)
    index_k[:, -1] = 100.0  # the last entry scores highest for everyone: only its visible queries may pick it
    weights = weights.abs()
    picks = indexer_topk(index_q, index_k, weights, ratio, topk, backend=backend, chunk_size=8)
    assert picks.shape == (2, seq_len, topk)
    for t in range(seq_len):
        n_visible = (t + 1) // ratio
        row = picks[:, t]
        assert (row < n_visible).all(), f"query {t} picked a future entry"
        valid = (row >= 0).sum(-1)
        assert (valid == min(topk, n_visible)).all(), f"query {t}: -1 must fill only missing picks"
        for b in range(2):
            got = row[b][row[b] >= 0].tolist()
            assert len(set(got)) == len(got)
    last = seq_len // ratio - 1
    t_first_sees_last = (last + 1) * ratio - 1  # the group's last token
    assert (picks[:, t_first_sees_last] == last).any(-1).all()
    assert not (picks[:, t_first_sees_last - 1] == last).any()


@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
def test_indexer_topk_ties_prefer_the_more_recent_entry(backend):
    """ReLU scores are often exactly equal (zeros): top-k then takes the MORE RECENT entries, the same on every
    backend, so the picks (and the model) do not depend on the backend or on torch.topk's arbitrary tie order."""
    seq_len, ratio = 37, 4
    index_q = torch.ones(1, seq_len, 3, 8)
    weights = torch.ones(1, seq_len, 3)
    index_k = torch.zeros(1, seq_len // ratio, 8)  # every score 0: all visible entries tie
    picks = indexer_topk(index_q, index_k, weights, ratio, 3, backend=backend, chunk_size=8)
    for t in range(seq_len):
        n_visible = (t + 1) // ratio
        assert sorted(picks[0, t][picks[0, t] >= 0].tolist()) == list(range(max(0, n_visible - 3), n_visible)), t
    index_k[0, 1] = index_k[0, 3] = 1.0  # entries 1 and 3 tie above the rest: top-1 takes 3 once it is visible
    picks = indexer_topk(index_q, index_k, weights, ratio, 1, backend=backend, chunk_size=8)
    for t in range(2 * ratio - 1, seq_len):
        assert picks[0, t, 0].item() == (3 if (t + 1) // ratio > 3 else 1), t


def test_indexer_topk_chunked_equals_naive():
    index_q, index_k, weights = make_indexer_inputs(129, 32, seed=4)
    a = indexer_topk(index_q, index_k, weights, 4, 7, backend="naive")
    b = indexer_topk(index_q, index_k, weights, 4, 7, backend="torch", chunk_size=16)
    assert torch.equal(a.sort(-1).values, b.sort(-1).values)


@pytest.mark.parametrize("sparse", [False, True])
def test_indexer_loss_chunked_equals_naive_and_trains_only_the_indexer(sparse):
    torch.manual_seed(sparse)
    seq_len, n_entries, heads, dim = 45, 11, 2, 6
    q = torch.randn(1, seq_len, heads, dim, requires_grad=True)
    cmp = torch.randn(1, n_entries, dim, requires_grad=True)
    lse = torch.logsumexp(torch.randn(1, seq_len, heads, 20), -1) + 1.0
    index_q, index_k, weights = (t.requires_grad_() for t in make_indexer_inputs(seq_len, n_entries, 2, batch=1))
    picks = indexer_topk(index_q, index_k, weights, 4, 3) if sparse else None
    losses, grads = [], []
    for backend in ("naive", "torch"):
        loss = indexer_kl_loss(q, cmp, lse, index_q, index_k, weights, 4, dim ** -0.5, topk_idx=picks,
                               backend=backend, chunk_size=8)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, (index_q, index_k, weights)))
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    assert losses[0] > 0
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)
    # the teacher is detached: no gradient reaches the main attention's q or compressed entries
    loss = indexer_kl_loss(q, cmp, lse, index_q, index_k, weights, 4, dim ** -0.5, topk_idx=picks)
    loss.backward()
    assert q.grad is None and cmp.grad is None


def test_backend_dispatch_names_the_choices():
    """"auto" runs the PyTorch path on CPU tensors; an unknown backend is an error naming the choices (it used to
    fall back to the PyTorch path silently)."""
    index_q, index_k, weights = make_indexer_inputs(21, 5, seed=6)
    assert torch.equal(indexer_topk(index_q, index_k, weights, 4, 3, backend="auto"),  # CPU tensors
                       indexer_topk(index_q, index_k, weights, 4, 3, backend="torch"))
    q, cmp, lse = torch.randn(2, 21, 2, 6), torch.randn(2, 5, 6), torch.zeros(2, 21, 2)
    with pytest.raises(ValueError, match="'flash'.*auto, naive, torch, triton"):
        indexer_topk(index_q, index_k, weights, 4, 3, backend="flash")
    with pytest.raises(ValueError, match="'flash'.*auto, naive, torch, triton"):
        indexer_kl_loss(q, cmp, lse, index_q, index_k, weights, 4, 0.4, backend="flash")


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


# ------------------------------------------------------------------ Triton kernels (interpreter on CPU)


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
