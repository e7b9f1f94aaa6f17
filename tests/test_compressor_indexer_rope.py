"""The compressor against hand computation, RoPE layout and YaRN, and the indexer's causal selection."""

import math

import pytest
import torch

from dsv4.compressor import Compressor
from dsv4.config import RopeScaling
from dsv4.ops.indexer import indexer_kl_loss, indexer_topk
from dsv4.rope import Rotary, rope_frequencies


def test_hca_compressor_hand_computed():
    """ratio 2, one input channel, two output channels, zero gates: entries are group means, normed, roped."""
    comp = Compressor(hidden_size=1, dim=2, ratio=2, overlap=False, eps=0.0)
    with torch.no_grad():
        comp.wkv.weight.copy_(torch.tensor([[1.0], [2.0]]))
        comp.wgate.weight.zero_()
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).view(1, 5, 1)  # token 4 is an incomplete group: no entry
    rotary = Rotary(2, theta=10000.0, scaling=None)  # one pair, frequency 1
    out = comp(x, rotary)
    assert out.shape == (1, 2, 2)
    a, b = 1 / math.sqrt(2.5), 2 / math.sqrt(2.5)  # (1.5, 3) and (3.5, 7) both normalise to (a, b)
    expected = torch.tensor([[a, b], [a * math.cos(2) - b * math.sin(2), a * math.sin(2) + b * math.cos(2)]])
    assert torch.allclose(out[0], expected, atol=1e-6)  # entry 1 sits at position 2 = its first token


def reference_compressor(comp: Compressor, x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Loops over entries, channels and slots; softmax written out with math.exp."""
    x = x.detach()
    r, c = comp.ratio, comp.dim
    kv = x @ comp.wkv.weight.detach().T
    gate = x @ comp.wgate.weight.detach().T
    ape = comp.ape.detach()
    batch, seq_len, _ = x.shape
    n = seq_len // r
    out = torch.zeros(batch, n, c)
    for b in range(batch):
        for i in range(n):
            for ch in range(c):
                rows = []  # (logit, value)
                if comp.overlap:
                    if i > 0:  # lookback series = the FIRST c channels, from group i-1
                        prev = (i - 1) * r
                        rows += [(gate[b, prev + j, ch] + ape[j, ch], kv[b, prev + j, ch]) for j in range(r)]
                    rows += [(gate[b, i * r + j, c + ch] + ape[j, c + ch], kv[b, i * r + j, c + ch]) for j in range(r)]
                else:
                    rows += [(gate[b, i * r + j, ch] + ape[j, ch], kv[b, i * r + j, ch]) for j in range(r)]
                top = max(float(lg) for lg, _ in rows)
                weights = [math.exp(float(lg) - top) for lg, _ in rows]
                out[b, i, ch] = sum(w * float(v) for w, (_, v) in zip(weights, rows)) / sum(weights)
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + comp.norm.eps) * comp.norm.weight.detach()
    return rotary(out, torch.arange(n) * r)


@pytest.mark.parametrize("overlap,ratio,seq_len", [(True, 4, 13), (True, 4, 3), (False, 8, 17), (False, 3, 9)])
def test_compressor_against_loops(overlap, ratio, seq_len):
    torch.manual_seed(ratio + seq_len)
    comp = Compressor(hidden_size=6, dim=4, ratio=ratio, overlap=overlap, eps=1e-6)
    with torch.no_grad():
        comp.ape.normal_()
        comp.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, seq_len, 6)
    rotary = Rotary(2, theta=10000.0, scaling=None)
    got = comp(x, rotary)
    assert got.shape == (2, seq_len // ratio, 4)
    assert torch.allclose(got, reference_compressor(comp, x, rotary), atol=1e-5)


def test_csa_entry_zero_has_no_lookback_and_entry_one_reads_eight_tokens():
    comp = Compressor(hidden_size=3, dim=2, ratio=4, overlap=True, eps=1e-6)
    rotary = Rotary(2, theta=10000.0, scaling=None)
    x = torch.randn(1, 12, 3)
    base = comp(x, rotary)
    for token, touched in ((2, [0, 1]), (5, [1, 2]), (9, [2])):
        x2 = x.clone()
        x2[0, token] += 1.0
        diff = (comp(x2, rotary) - base).abs().amax(-1)[0] > 1e-7
        assert diff.nonzero().flatten().tolist() == touched, f"token {token}"


def test_rope_is_interleaved_on_the_tail():
    rotary = Rotary(4, theta=100.0, scaling=None)
    x = torch.tensor([[[9.0, 9.0, 1.0, 0.0, 1.0, 0.0]]])  # [B=1, S=1, D=6]: 2 position-free + 2 pairs
    out = rotary(x, torch.tensor([3]))
    w0, w1 = 1.0, 100.0 ** (-2 / 4)
    expected = [9.0, 9.0, math.cos(3 * w0), math.sin(3 * w0), math.cos(3 * w1), math.sin(3 * w1)]
    assert torch.allclose(out[0, 0], torch.tensor(expected), atol=1e-6)
    back = rotary(out, torch.tensor([3]), inverse=True)
    assert torch.allclose(back, x, atol=1e-6)


@pytest.mark.parametrize("inverse", [False, True])
def test_rope_gradient_is_the_inverse_rotation(inverse):
    """Rotary's hand-written backward equals autograd through the rotation written out op by op."""
    rotary = Rotary(8, theta=1000.0, scaling=RopeScaling())
    x = torch.randn(2, 11, 3, 12, requires_grad=True)
    positions = torch.randint(0, 500, (2, 11))
    grad = torch.randn(2, 11, 3, 12)
    (got,) = torch.autograd.grad(rotary(x, positions, inverse=inverse), x, grad)
    cos, sin = rotary.cos_sin(positions)
    cos, sin = cos[:, :, None], (-1 if inverse else 1) * sin[:, :, None]
    real, imag = x[..., 4::2], x[..., 5::2]
    tail = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2)
    (want,) = torch.autograd.grad(torch.cat((x[..., :4], tail), -1), x, grad)
    assert torch.allclose(got, want, atol=1e-6)


def test_yarn_frequencies_match_the_published_ramp():
    """theta 160000, 64 rope dims, factor 16, L0 65536: pairs <= 15 unchanged, >= 25 divided by 16."""
    scaled = rope_frequencies(64, 160000.0, RopeScaling())
    plain = rope_frequencies(64, 160000.0, None)
    ratio = scaled / plain
    assert torch.allclose(ratio[:16], torch.ones(16, dtype=torch.float64))
    assert torch.allclose(ratio[25:], torch.full((7,), 1 / 16, dtype=torch.float64))
    assert ((ratio[16:25] < 1) & (ratio[16:25] > 1 / 16)).all()


def make_indexer_inputs(seq_len, n_entries, seed=0, batch=2):
    gen = torch.Generator().manual_seed(seed)
    index_q = torch.randn(batch, seq_len, 3, 8, generator=gen)
    index_k = torch.randn(batch, n_entries, 8, generator=gen)
    weights = torch.randn(batch, seq_len, 3, generator=gen)
    return index_q, index_k, weights


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


def test_indexer_recall_counts_the_teachers_top_k():
    from dsv4.ops.indexer.recall import indexer_recall

    torch.manual_seed(0)
    q, cmp = torch.randn(1, 40, 2, 8), torch.randn(1, 10, 8)
    lse = torch.full((1, 40, 2), 3.0)
    t = torch.arange(40)[:, None]
    visible = torch.arange(10)[None, :] < (t + 1) // 4
    mass = torch.exp(torch.einsum("bthd,bnd->bthn", q, cmp) * 0.5 - 3.0).mean(2).masked_fill(~visible, -1.0)
    k = 3
    teacher = mass.topk(k, dim=-1).indices
    n_vis = visible.sum(-1)
    perfect = torch.where(torch.arange(k)[None, None, :] < n_vis[None, :, None], teacher, -1)
    assert torch.isclose(indexer_recall(q, cmp, lse, perfect, 4, 0.5), torch.tensor(1.0))
    assert indexer_recall(q, cmp, lse, torch.full_like(perfect, -1), 4, 0.5) == 0.0
    half = perfect.clone()
    half[..., 1:] = -1  # only the teacher's best entry
    expected = (1.0 / n_vis.clamp(max=k).clamp(min=1).float())[n_vis > 0].mean()
    assert torch.isclose(indexer_recall(q, cmp, lse, half, 4, 0.5), expected)


def test_model_reports_sink_mass_and_indexer_recall_when_asked():
    from dsv4 import ModelConfig, build_model

    model = build_model(ModelConfig(), phase="sparse")
    ids = torch.randint(0, 4096, (1, 96))
    model(ids)
    assert model.attention_stats() == {}  # not collected unless asked
    model.options.collect_stats = True
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.attn_sink.fill_(30.0)  # a dominant sink takes (almost) all the mass
    model(ids)
    stats = model.attention_stats()
    assert stats["sink_mass"] > 0.99 and 0.0 <= stats["indexer_recall"] <= 1.0
