"""The layer kinds (dsv4/layer_kinds.py): each ratio selects one kind, every kind builds its layer and its cache,
and the model-level numbers (MFU's attention FLOPs, the KV-cache bytes) are the sums of the kinds' formulas."""

import copy
import pickle

import pytest
import torch

from dsv4.attention import DenseAttention, V4Attention
from dsv4.config import ConfigError, ModelConfig
from dsv4.inference import ModelCache, forward_step
from dsv4.inference.cache import DenseLayerCache, V4LayerCache
from dsv4.inference.memory import v4_cache_terms
from dsv4.layer_kinds import CSA, DENSE, HCA, KINDS, WINDOW, find_kind, visible_entries, window_keys
from dsv4.model import DSV4Model
from dsv4.training import flops

TINY = dict(vocab_size=53, hidden_size=32, num_hidden_layers=4, intermediate_size=48, num_attention_heads=4,
            head_dim=16, qk_rope_head_dim=8, q_lora_rank=16, o_groups=2, o_lora_rank=8, sliding_window=6,
            compress_ratios=[0, 4, 8, -1], index_n_heads=2, index_head_dim=8, index_topk=2, num_key_value_heads=2)


def test_each_ratio_selects_one_kind_and_layer_kind_keeps_its_names():
    for ratio, kind in ((0, WINDOW), (4, CSA), (5, HCA), (128, HCA), (-1, DENSE)):
        assert find_kind(ratio) is kind
        assert [k for k in KINDS if k.selects(ratio)] == [kind]
    for ratio in (1, 2, 3, -2):
        assert find_kind(ratio) is None
    cfg = ModelConfig(**TINY)
    assert [cfg.layer_kind(i) for i in range(4)] == ["window", "csa", "hca", "dense"]
    assert cfg.layer_specs() == [WINDOW, CSA, HCA, DENSE]


@pytest.mark.parametrize("ratio", [2, -3])
def test_an_unknown_ratio_names_the_key_and_every_kind(ratio):
    with pytest.raises(ConfigError, match=rf"compress_ratios\[2\]={ratio}: unsupported") as err:
        ModelConfig(**dict(TINY, compress_ratios=[0, 4, ratio, -1]))
    for kind in KINDS:
        assert kind.ratio_rule in str(err.value)


def test_kinds_survive_deepcopy_and_pickle():
    for kind in KINDS:
        assert copy.deepcopy(kind) is kind and pickle.loads(pickle.dumps(kind)) is kind


def test_closed_forms_equal_the_sums_over_queries():
    for seq_len in (0, 1, 3, 4, 7, 8, 9, 31, 64, 130):
        t = torch.arange(seq_len, dtype=torch.int64)
        for window in (1, 4, 6, 128):
            assert window_keys(seq_len, window) == int(torch.clamp(t + 1, max=window).sum())
        for ratio in (1, 4, 5, 8, 128):
            visible = (t + 1) // ratio
            assert visible_entries(seq_len, ratio) == int(visible.sum())
            for topk in (1, 2, 3, 16):
                assert visible_entries(seq_len, ratio, topk) == int(torch.clamp(visible, max=topk).sum())


def test_every_kind_builds_its_layer_with_the_parts_it_states():
    cfg = ModelConfig(**TINY)
    model = DSV4Model(cfg, backend="torch")
    for block, spec in zip(model.layers, cfg.layer_specs()):
        attn = block.attn
        assert attn.spec is spec
        assert isinstance(attn, V4Attention if spec.v4 else DenseAttention)
        assert hasattr(attn, "compressor") == spec.compressor
        assert hasattr(attn, "indexer") == spec.indexer
        if spec.compressor:
            assert attn.compressor.overlap == spec.overlap and attn.ratio == attn.compressor.ratio
    assert {spec.name for spec in cfg.layer_specs()} == {kind.name for kind in KINDS}  # the test covers every kind


@pytest.mark.parametrize("cache_dtype", ["model", "fp8"])
def test_cache_bytes_per_layer_are_the_kinds_formula(cache_dtype):
    """Every kind keeps a cache; the bytes read off each layer's cache after a prefill and a few decode steps are
    its kind's cache_bytes, and the terms it holds are the ones its cache_state names."""
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY)
    model = DSV4Model(cfg, backend="torch").eval()
    cache = ModelCache(model, 1, cache_dtype)
    ids = torch.randint(0, 53, (1, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        forward_step(model, cache, ids[:, :17])
        for i in range(17, 21):
            forward_step(model, cache, ids[:, i:i + 1])
    tokens = 21
    for layer, spec, ratio in zip(cache.layers, cfg.layer_specs(), cfg.compress_ratios):
        assert isinstance(layer, V4LayerCache if spec.v4 else DenseLayerCache)
        one = ModelCache.__new__(ModelCache)  # this layer alone, read as ModelCache.nbytes reads every layer
        one.layers, one.lengths = [layer], cache.lengths
        held = {k: v for k, v in one.nbytes().items() if k != "total" and v}
        formula = spec.cache_bytes(cfg, ratio, tokens, cache_dtype, element_size=4)
        assert held == formula, spec
        assert set(formula) == set(spec.cache_state), spec


def test_model_flops_and_cache_formula_are_sums_over_the_kinds():
    cfg = ModelConfig(**TINY)
    seq_len = 40
    for phase in ("dense", "indexer_warmup", "sparse"):
        per_kind = [spec.attention_flops(cfg, r, seq_len, phase) for spec, r in zip(cfg.layer_specs(),
                                                                                     cfg.compress_ratios)]
        assert flops.attention_flops_per_sequence(cfg, seq_len, phase) == 3 * sum(sum(f.values()) for f in per_kind)
    total = sum(sum(spec.cache_bytes(cfg, r, 1000, "fp8").values())
                for spec, r in zip(cfg.layer_specs(), cfg.compress_ratios))
    assert v4_cache_terms(cfg, 1000, "fp8")["total"] == total


def test_sequence_parallel_traffic_by_kind():
    """By hand, bf16, shard L = 64 on P = 4 ranks: W - 1 = 5 K=V rows of c = 16 to the next rank; CSA adds its last
    group's 4 hidden states (d = 32) and gathers 16 entries (c) and 16 indexer keys (c_I = 8) to 3 ranks; HCA
    gathers 8 entries; dense sends 3/4 of q, k, v and the output (H = 4 heads of d_h = 8) in Ulysses all-to-alls."""
    cfg = ModelConfig(**TINY)
    halo = 5 * 16 * 2
    assert WINDOW.sp_bytes(cfg, 0, 64, 4) == {"halo": halo}
    assert CSA.sp_bytes(cfg, 4, 64, 4) == {"halo": halo + 4 * 32 * 2, "all_gather": 3 * 16 * (16 + 8) * 2}
    assert CSA.sp_bytes(cfg, 4, 64, 4, phase="dense")["all_gather"] == 3 * 16 * 16 * 2  # indexer idle
    assert HCA.sp_bytes(cfg, 8, 64, 4) == {"halo": halo, "all_gather": 3 * 8 * 16 * 2}
    assert DENSE.sp_bytes(cfg, -1, 64, 4) == {"ulysses_all_to_all": 4 * 64 * 4 * 8 * 2 * 3 / 4}
