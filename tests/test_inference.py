"""The KV cache and incremental decoding against the full forward, at every group and window boundary.

Relative error here is max |decode - full| / max |full| over the logits of every position (fp32)."""

import pytest
import torch

from dsv4.config import ModelConfig
from dsv4.inference import ModelCache, forward_step, generate_ids, prefill
from dsv4.inference.memory import v4_cache_terms
from dsv4.model import DSV4Model
from dsv4.run_config import AttentionConfig, apply_layout

WINDOW, HCA = 6, 8
# prompt lengths that end at every phase of the open group and around the window: 1, 3, 4, 5, 7, 8, 9,
# ratio-1, ratio, ratio+1 (HCA 8: 7, 8, 9), window-1, window, window+1 (5, 6, 7), 2*window+1 (13), and 2, 10
PROMPTS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13]
TOTAL = 34  # every decode runs through several CSA and HCA groups and past the window


def config(ratios, **overrides) -> ModelConfig:
    values = dict(vocab_size=97, hidden_size=32, num_hidden_layers=len(ratios), intermediate_size=48,
                  num_attention_heads=3, head_dim=16, qk_rope_head_dim=4, q_lora_rank=16, o_groups=1, o_lora_rank=8,
                  sliding_window=WINDOW, compress_ratios=ratios, index_n_heads=2, index_head_dim=8, index_topk=3,
                  num_key_value_heads=1, dense_head_dim=8)
    values.update(overrides)
    return ModelConfig(**values)


def build(ratios, phase="sparse", seed=0, **overrides) -> DSV4Model:
    torch.manual_seed(seed)
    model = DSV4Model(config(ratios, **overrides), backend="torch", chunk_size=5, phase=phase).eval()
    with torch.no_grad():  # the slot biases and sinks start at zero: give them values that matter
        for name, p in model.named_parameters():
            if name.endswith(("ape", "attn_sink")):
                p.normal_(0.0, 1.0)
    return model


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def decode_all(model, ids: torch.Tensor, prompt: int, cache_dtype: str = "model", chunk: int | None = None):
    """Logits of every position: prefill `prompt` tokens (in chunks), then one token at a time."""
    cache = ModelCache(model, ids.shape[0], cache_dtype)
    chunk = chunk or prompt
    outs = [forward_step(model, cache, ids[:, first: min(first + chunk, prompt)]) for first in range(0, prompt, chunk)]
    outs += [forward_step(model, cache, ids[:, t: t + 1]) for t in range(prompt, ids.shape[1])]
    return torch.cat(outs, dim=1), cache


SCHEDULES = {
    "window": [0], "csa": [4], "hca": [HCA], "dense": [-1],
    "tiny": [0, 4, HCA, 4],
    "v4_flash": apply_layout({"num_hidden_layers": 4}, AttentionConfig(layout="v4_flash", hca_ratio=HCA)),
    "v4_pro": apply_layout({"num_hidden_layers": 4}, AttentionConfig(layout="v4_pro", hca_ratio=HCA)),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_decode_equals_full_forward_at_every_boundary(name):
    model = build(SCHEDULES[name])
    ids = torch.randint(0, 97, (1, TOTAL), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        for prompt in PROMPTS:
            got, _ = decode_all(model, ids, prompt)
            assert relative_error(got, full) <= 1e-5, (name, prompt, relative_error(got, full))


@pytest.mark.parametrize("phase", ["dense", "indexer_warmup"])
def test_csa_decode_in_the_dense_phases(phase):
    model = build([4, HCA], phase=phase)
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        for prompt in (1, 4, 7):
            assert relative_error(decode_all(model, ids, prompt)[0], full) <= 1e-5


def test_schedules_cover_their_layer_kinds():
    assert SCHEDULES["v4_flash"] == [0, 0, 4, HCA] and SCHEDULES["v4_pro"] == [HCA, HCA, 4, HCA]


def test_chunked_prefill_equals_one_prefill_and_a_prefill_after_decode():
    model = build([0, 4, HCA, -1])
    ids = torch.randint(0, 97, (1, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        one, cache_one = decode_all(model, ids, 23)
        for chunk in (1, 3, 4, HCA, 5):
            chunked, cache = decode_all(model, ids, 23, chunk=chunk)
            assert relative_error(chunked, one) <= 1e-6, chunk
            for a, b in zip(cache.layers, cache_one.layers):
                for state_a, state_b in zip(a.states(), b.states()) if hasattr(a, "states") else ():
                    assert torch.equal(state_a.count, state_b.count)
        # multi-turn: prefill 10, decode 5, then prefill 9 more at once, then decode to the end
        cache = ModelCache(model, 1)
        parts = [forward_step(model, cache, ids[:, :10])]
        parts += [forward_step(model, cache, ids[:, t: t + 1]) for t in range(10, 15)]
        parts.append(forward_step(model, cache, ids[:, 15:24]))
        parts += [forward_step(model, cache, ids[:, t: t + 1]) for t in range(24, 29)]
        assert relative_error(torch.cat(parts, 1), full) <= 1e-5


def test_csa_decode_picks_the_full_forward_entries():
    model = build([4])
    attn = model.layers[0].attn
    ids = torch.randint(0, 97, (1, TOTAL), generator=torch.Generator().manual_seed(4))
    seen = {}
    hook = attn.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    with torch.no_grad():
        model(ids)
        hook.remove()
        x = seen["x"]  # the layer's input over the whole sequence
        positions = torch.arange(TOTAL)
        from dsv4.ops.indexer import indexer_topk

        q, q_latent = attn.queries(x, positions)
        index_q, index_k, weights = attn.indexer(x, q_latent, attn.rotary, positions, 0)
        full_picks = indexer_topk(index_q, index_k, weights, ratio=4, topk=attn.cfg.index_topk)[0]  # [S, k]
        cache = ModelCache(model, 1)
        forward_step(model, cache, ids[:, :3])
        checked = 0
        for t in range(3, TOTAL):
            forward_step(model, cache, ids[:, t: t + 1])
            picks = cache.layers[0].last_topk[0, 0]
            want = sorted(i for i in full_picks[t].tolist() if i >= 0)
            assert sorted(i for i in picks.tolist() if i >= 0) == want, t
            checked += len(want) > 0
        assert checked >= TOTAL - 8  # from t = 3 on, queries have entries to pick


def test_batch_of_different_lengths_equals_each_alone():
    model = build([0, 4, HCA, -1])
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (3, 9, 4, 13)]
    with torch.no_grad():
        alone = [generate_ids(model, [p], max_new_tokens=12)[0][0] for p in prompts]
        together, stats = generate_ids(model, prompts, max_new_tokens=12)
        assert together == alone
        assert stats.prompt_tokens == [3, 9, 4, 13] and stats.new_tokens == 48
        # and the logits of the stacked decode equal each sequence's own
        caches = [prefill(model, p)[0] for p in prompts]
        batch = ModelCache.stack(caches)
        nxt = torch.tensor([[p[-1]] for p in prompts])
        together_logits = forward_step(model, batch, nxt)
        for i, p in enumerate(prompts):
            cache, _ = prefill(model, p)
            own = forward_step(model, cache, nxt[i: i + 1])
            assert relative_error(together_logits[i: i + 1], own) <= 1e-6


def test_greedy_generate_equals_the_argmax_loop_over_the_full_forward():
    model = build([0, 4, HCA, 4])
    prompt = torch.randint(0, 97, (11,), generator=torch.Generator().manual_seed(6)).tolist()
    with torch.no_grad():
        tokens, _ = generate_ids(model, [prompt], max_new_tokens=25)
        ids = list(prompt)
        for _ in range(25):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert tokens[0] == ids[len(prompt):]


def test_sampling_is_seeded_and_respects_top_k():
    model = build([0, 4])
    prompt = [5, 6, 7]
    with torch.no_grad():
        a, _ = generate_ids(model, [prompt], max_new_tokens=10, temperature=1.0, top_k=2, seed=3)
        b, _ = generate_ids(model, [prompt], max_new_tokens=10, temperature=1.0, top_k=2, seed=3)
        assert a == b
        cache, logits = prefill(model, prompt)
        allowed = set(torch.topk(logits, 2).indices.tolist())
        firsts = {generate_ids(model, [prompt], max_new_tokens=1, temperature=2.0, top_k=2, seed=s)[0][0][0]
                  for s in range(20)}
        assert firsts <= allowed and len(firsts) == 2


@pytest.mark.parametrize("cache_dtype", ["model", "fp8"])
@pytest.mark.parametrize("tokens", [1, 7, 29])
def test_cache_bytes_read_off_the_tensors_equal_the_formula(cache_dtype, tokens):
    # 64 non-RoPE channels: one full scale tile and a partial one
    model = build([0, 4, HCA, -1], head_dim=80, qk_rope_head_dim=16, index_head_dim=16)
    with torch.no_grad():
        cache, _ = prefill(model, list(range(1, tokens + 1)), cache_dtype=cache_dtype)
    assert cache.nbytes() == v4_cache_terms(model.config, tokens, cache_dtype, element_size=4)


def test_fp8_cache_stores_fp8_and_stays_close_to_fp32():
    model = build([0, 4, HCA, 4], head_dim=80, qk_rope_head_dim=16, index_head_dim=16)
    ids = torch.randint(0, 97, (1, TOTAL), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        exact, _ = decode_all(model, ids, 9)
        fp8, cache = decode_all(model, ids, 9, cache_dtype="fp8")
        fp8_chunked, _ = decode_all(model, ids, 9, cache_dtype="fp8", chunk=2)
    ring = cache.layers[1].ring.parts
    assert ring["nope"].dtype == torch.float8_e4m3fn and ring["rope"].dtype == torch.bfloat16
    assert ring["scale"].dtype == torch.float8_e8m0fnu and ring["scale"].shape[-1] == 1
    assert cache.layers[1].indexer.entries.parts["key"].dtype == torch.float8_e4m3fn
    # what is stored is what is read, for every token: chunking changes nothing beyond fp32 rounding
    assert relative_error(fp8_chunked, fp8) <= 1e-5
    err = relative_error(fp8, exact)
    # the rounding is real (> 0); e4m3 keeps 3 mantissa bits (~2.4% rms per row): measured 0.084 here, through
    # four layers of random weights with unit-scale slot biases and sinks (benchmarks/kv_cache.py reports it for
    # a trained model)
    assert 0 < err <= 0.15, err


@pytest.mark.slow
def test_decode_on_the_triton_kernels_equals_the_full_forward():
    """The decode step runs the same ops as training, so on CUDA it runs the Triton kernels (here: interpreter)."""
    model = build([0, 4, HCA])
    model.set_attention_options(backend="triton")
    ids = torch.randint(0, 97, (1, 13), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = model(ids)
        got, _ = decode_all(model, ids, 5)
    assert relative_error(got, full) <= 1e-5
