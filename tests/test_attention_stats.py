"""Attention statistics (dsv4.attention_stats): indexer recall against the teacher's top-k, and the model
reporting sink mass and recall when asked."""

import torch

from dsv4 import ModelConfig, build_model
from dsv4.attention_stats import indexer_recall


def test_indexer_recall_counts_the_teachers_top_k():
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
