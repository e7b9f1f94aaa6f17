"""The whole model on the Triton backend (TRITON_INTERPRET=1 on CPU, tiny shapes) equals the PyTorch backend, with
documents too, and trains; every kernel output element is written. The kernels themselves, against their oracles:
tests/test_op_v4_attention.py and tests/test_op_indexer.py."""

import copy

import pytest
import torch

import dsv4.ops.triton_common as triton_common
from dsv4 import build_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1 (conftest)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN: any element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(triton_common, "POISON_OUTPUTS", True)


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


