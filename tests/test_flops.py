"""The MFU FLOP count (dsv4/training/flops.py) against a hand count for a tiny config, and the peak lookup."""

import pytest
import torch

from dsv4.config import ModelConfig
from dsv4.model import DSV4Model
from dsv4.training import flops

# S = 8 queries (t = 0..7), window W = 4, one layer of each type: window, CSA (m=4, top-1), HCA (m=8), dense.
TINY = dict(vocab_size=32, hidden_size=16, num_hidden_layers=4, intermediate_size=24, num_attention_heads=2,
            head_dim=8, qk_rope_head_dim=4, q_lora_rank=8, o_groups=1, o_lora_rank=8, sliding_window=4,
            compress_ratios=[0, 4, 8, -1], index_n_heads=2, index_head_dim=4, index_topk=1, num_key_value_heads=1)


def test_attention_keys_by_hand():
    cfg = ModelConfig(**TINY)
    # window rows min(t+1, 4):            1 2 3 4 4 4 4 4 = 26
    # CSA visible entries (t+1)//4:       0 0 0 1 1 1 1 2 = 6 ; top-1 of them: 0 0 0 1 1 1 1 1 = 5
    # HCA visible entries (t+1)//8:       0 0 0 0 0 0 0 1 = 1
    # dense causal keys t+1:              1 .. 8 = 36
    sparse = [flops.layer_attention_counts(cfg, layer, 8, "sparse") for layer in range(4)]
    assert [c["kind"] for c in sparse] == ["window", "csa", "hca", "dense"]
    assert [c["keys"] for c in sparse] == [26, 26 + 5, 26 + 1, 36]
    assert [c["indexer_entries"] for c in sparse] == [0, 6, 0, 0]
    dense_phase = flops.layer_attention_counts(cfg, 1, 8, "dense")
    assert dense_phase["keys"] == 26 + 6 and dense_phase["indexer_entries"] == 0  # all visible; indexer idle
    assert flops.layer_attention_counts(cfg, 1, 8, "indexer_warmup")["indexer_entries"] == 6


def test_training_flops_by_hand():
    cfg = ModelConfig(**TINY)
    model = DSV4Model(cfg)
    # matmul parameters: every >= 2-D weight except the embedding and the compressors' ape
    by_hand = sum(p.numel() for n, p in model.named_parameters()
                  if p.dim() == 2 and n != "embed.weight" and not n.endswith("ape"))
    assert flops.matmul_params(model) == by_hand
    assert by_hand < sum(p.numel() for p in model.parameters())
    # attention, sparse phase, x3 for forward + backward:
    #   V4 layers: 4 * H(2) * head_dim(8) = 64 FLOPs per key: window 26, CSA 31, HCA 27 keys -> 64 * 84 = 5376
    #   dense layer: 4 * H(2) * (16 // 2 = 8) * 36 keys = 2304
    #   CSA indexer: 2 * 2 heads * 4 dims * 6 entries = 96
    attention = 3 * (5376 + 2304 + 96)
    assert flops.attention_flops_per_sequence(cfg, 8, "sparse") == attention
    assert flops.training_flops_per_sequence(cfg, 8, "sparse", by_hand) == 6 * by_hand * 8 + attention
    # dense phase: CSA attends to all 6 visible entries (+1 key over top-1), the indexer is idle
    assert flops.attention_flops_per_sequence(cfg, 8, "dense") == 3 * (5376 + 64 + 2304)


def test_peak_lookup():
    cpu = torch.device("cpu")
    assert flops.peak_flops_per_rank(None, cpu)[0] is None
    assert flops.peak_flops_per_rank(100, cpu)[0] == pytest.approx(1e14)
    value, why = flops.peak_flops_per_rank("auto", cpu)
    assert value is None and "MFU not reported" in why
    names = [name for name, _ in flops.PEAK_TFLOPS_BF16]
    assert names.index("H100 PCIe") < names.index("H100")  # the more specific name matches first
