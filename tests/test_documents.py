"""Document masking: a packed sequence with per-document positions equals running each document alone,
for every layer type and CSA phase, outputs and gradients; and the masks it builds."""

import pytest
import torch

from dsv4 import build_model
from dsv4.ops.ranges import causal_ranges, document_ranges, group_starts

TINY = dict(vocab_size=53, hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=2,
            head_dim=16, qk_rope_head_dim=8, q_lora_rank=16, o_groups=2, o_lora_rank=8, sliding_window=6,
            index_n_heads=2, index_head_dim=8, index_topk=3, num_key_value_heads=1)
DOC_LENGTHS = [7, 1, 13, 4, 26]  # not multiples of 4 or 8; a 1-token document; 51 tokens in all


def packed_positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])


@pytest.mark.parametrize("ratios,phase", [
    ([0, 0], "sparse"), ([4, 4], "dense"), ([4, 4], "indexer_warmup"), ([4, 4], "sparse"), ([8, 4], "sparse"),
    ([-1, 8], "sparse"),
])
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_packed_documents_equal_separate_runs(ratios, phase, backend):
    torch.manual_seed(0)
    model = build_model(dict(TINY, compress_ratios=ratios), backend=backend, chunk_size=16, phase=phase)
    with torch.no_grad():  # non-zero slot biases and sinks, so every term matters
        for layer in model.layers:
            for name, p in layer.attn.named_parameters():
                if name.endswith("ape") or name == "attn_sink":
                    p.normal_()
    ids = torch.randint(0, 53, (2, sum(DOC_LENGTHS)))
    positions = packed_positions(DOC_LENGTHS)[None].expand(2, -1)
    weights = torch.randn(2, sum(DOC_LENGTHS), 53)

    packed = model(ids, positions=positions)
    (packed * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    start = 0
    alone_loss = 0.0
    for n in DOC_LENGTHS:
        alone = model(ids[:, start: start + n])
        assert torch.allclose(packed[:, start: start + n], alone, atol=2e-5), f"document at {start} (length {n})"
        alone_loss = alone_loss + (alone * weights[:, start: start + n]).sum()
        start += n
    alone_loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(packed_grads[name], p.grad, atol=5e-5, rtol=1e-4), name


def test_document_ranges_and_groups():
    positions = packed_positions([5, 9])[None]  # documents at rows 0..4 and 5..13
    starts = group_starts(positions, 4)
    assert starts.tolist() == [[0, 5, 9]]  # doc 1: rows 0-3; doc 2: rows 5-8 and 9-12 (row 13 is incomplete)
    r = document_ranges(positions, window=3, ratio=4, starts=starts)
    assert r.window_lo[0].tolist() == [0, 0, 0, 1, 2, 5, 5, 5, 6, 7, 8, 9, 10, 11]
    assert r.cmp_lo[0].tolist() == [0] * 5 + [1] * 9
    assert r.cmp_hi[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    plain = causal_ranges(1, 14, 3, 4, positions.device)
    same = document_ranges(torch.arange(14)[None], 3, 4, group_starts(torch.arange(14)[None], 4))
    for a, b in zip((plain.window_lo, plain.window_hi, plain.cmp_lo, plain.cmp_hi),
                    (same.window_lo, same.window_hi, same.cmp_lo, same.cmp_hi)):
        assert torch.equal(a, b), "one document spanning the sequence is the plain causal case"


def test_positions_must_match_input_shape():
    model = build_model(dict(TINY, compress_ratios=[0, 4]))
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(1, 8, dtype=torch.long), positions=torch.zeros(1, 7, dtype=torch.long))
