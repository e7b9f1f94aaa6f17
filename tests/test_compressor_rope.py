"""The compressor against hand computation, RoPE layout and YaRN. (The indexer's causal selection:
test_op_indexer.py.)"""

import math

import pytest
import torch

from dsv4.compressor import Compressor
from dsv4.config import RopeScaling
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


