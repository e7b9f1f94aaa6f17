"""Prefill, sampling and generation on the KV cache.

    from dsv4.inference import generate
    result = generate(model, tokenizer, ["Once upon a time"], max_new_tokens=50)         # greedy
    result = generate(model, tokenizer, prompts, temperature=0.8, top_p=0.95, seed=0, cache_dtype="fp8")
    result.texts, result.token_ids, result.stats

Batches of prompts of different lengths: each prompt is prefilled on its own (in chunks of `prefill_chunk`
tokens, so a long prompt fits in memory), then the caches are stacked and decoded together, one token per step,
each sequence at its own position. Nothing is padded, so compression groups start at every prompt's first
token, as in training. A sequence stops at the tokenizer's end-of-text token (unless `stop_at_eos=False`) or
after `max_new_tokens`; the batch stops when every sequence has.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from data_pipelines.tokenizer import EOS_CANDIDATES
from dsv4.config import ConfigError
from dsv4.inference.cache import ModelCache
from dsv4.inference.step import forward_step

PREFILL_CHUNK = 1024


@dataclass
class GenerationStats:
    prompt_tokens: list[int]  # per sequence
    new_tokens: int = 0  # generated tokens, all sequences together
    prefill_s: float = 0.0
    decode_s: float = 0.0
    cache_bytes: dict[str, int] = field(default_factory=dict)  # ModelCache.nbytes() at the end
    dense_cache_bytes: int = 0  # what a dense GQA cache of the same model would hold for the same tokens

    @property
    def prefill_tokens_per_s(self) -> float:
        return sum(self.prompt_tokens) / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")


@dataclass
class Generation:
    token_ids: list[list[int]]  # the new tokens of each sequence (its end-of-text token included, if reached)
    texts: list[str]
    stats: GenerationStats


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B] from logits [B, vocab]: argmax when temperature is 0, else sampled from the softmax at that
    temperature, restricted to the top_k most likely tokens and to the smallest set holding top_p of the mass."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        mass_before = torch.softmax(ordered, dim=-1).cumsum(-1) - torch.softmax(ordered, dim=-1)
        drop = mass_before >= top_p  # tokens after the set already holding top_p (the first always stays)
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens={max_new_tokens}: must be >= 0")
    if not math.isfinite(temperature):
        raise ConfigError(f"--temperature={temperature}: must be a finite number >= 0 (0 = greedy)")
    if temperature < 0:
        raise ConfigError(f"--temperature={temperature}: must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k={top_k}: must be >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top-p={top_p}: must be in (0, 1]")


def check_device(text: str, flag: str = "--device") -> torch.device:
    """The torch.device a --device value names, checked before any work: 'auto' (cuda when available, else cpu),
    cpu, or cuda[:N] on a machine with that GPU; ConfigError naming the flag otherwise."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{flag}={text}: not a device; use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{flag}={text}: unsupported device type {device.type!r}; use cpu or cuda[:N]")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag}={text}: CUDA is not available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag}={text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@torch.no_grad()  # (not inference_mode: a cache must stay usable outside it)
def prefill(model, prompt_ids: list[int], cache_dtype: str = "model", chunk: int = PREFILL_CHUNK
            ) -> tuple[ModelCache, torch.Tensor]:
    """One prompt through the model in chunks -> (its cache, the logits of its last token [vocab])."""
    if not prompt_ids:
        raise ConfigError("prompt: empty (at least one token is needed)")
    if chunk < 1:
        raise ConfigError(f"prefill chunk={chunk}: must be >= 1")
    device = model.embed.weight.device
    cache = ModelCache(model, 1, cache_dtype)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    for first in range(0, ids.shape[1], chunk):
        logits = forward_step(model, cache, ids[:, first: first + chunk])
    return cache, logits[0, -1]


def dense_cache_bytes(config, tokens: int, element_size: int) -> int:
    """What a dense GQA cache of the same model (every layer a compress_ratios -1 layer: num_key_value_heads x
    the dense head dim, K and V) would hold for `tokens` tokens."""
    return config.num_hidden_layers * tokens * 2 * config.num_key_value_heads * config.resolved_dense_head_dim * \
        element_size


@torch.no_grad()  # (not inference_mode: a cache must stay usable outside it)
def generate_ids(model, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 cache_dtype: str = "model", prefill_chunk: int = PREFILL_CHUNK, eos_id: int | None = None,
                 on_step: Callable[[list[int | None]], None] | None = None) -> tuple[list[list[int]], GenerationStats]:
    """Token-level generation. on_step(tokens): called after every step with each sequence's new token (None
    for a sequence that has stopped). Returns the new tokens of each sequence and the stats."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    limit = model.config.max_position_embeddings
    for i, prompt in enumerate(prompts):
        if len(prompt) > limit:
            raise ConfigError(f"prompt {i}: {len(prompt)} tokens exceed the model's max_position_embeddings "
                              f"({limit})")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
    stats = GenerationStats(prompt_tokens=[len(p) for p in prompts])
    began = time.perf_counter()
    caches, last_logits = zip(*(prefill(model, p, cache_dtype, prefill_chunk) for p in prompts))
    cache = caches[0] if len(caches) == 1 else ModelCache.stack(list(caches))
    logits = torch.stack(last_logits)  # [B, vocab]
    stats.prefill_s = time.perf_counter() - began

    began = time.perf_counter()
    outputs: list[list[int]] = [[] for _ in prompts]
    running = [True] * len(prompts)
    steps = min(max_new_tokens, limit - max(len(p) for p in prompts))
    for step in range(steps):
        tokens = sample(logits, temperature, top_k, top_p, generator)
        emitted: list[int | None] = []
        for i, token in enumerate(tokens.tolist()):
            emitted.append(token if running[i] else None)
            if running[i]:
                outputs[i].append(token)
                running[i] = not (eos_id is not None and token == eos_id)
        if on_step is not None:
            on_step(emitted)
        if not any(running) or step == steps - 1:
            break
        logits = forward_step(model, cache, tokens[:, None])[:, -1]
    stats.decode_s = time.perf_counter() - began
    stats.new_tokens = sum(len(o) for o in outputs)
    stats.cache_bytes = cache.nbytes()
    stats.dense_cache_bytes = dense_cache_bytes(model.config, int(cache.lengths.sum()),
                                                model.embed.weight.element_size())
    return outputs, stats


def generate(model, tokenizer, prompts: str | list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             cache_dtype: str = "model", prefill_chunk: int = PREFILL_CHUNK, eos_id: int | None = None,
             stop_at_eos: bool = True, on_step: Callable[[list[int | None]], None] | None = None) -> Generation:
    """Text in, text out (a `tokenizers.Tokenizer`). eos_id: the end-of-text token (default: the first of the
    usual names in the vocabulary); with stop_at_eos a sequence ends there."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ConfigError("prompts: none given")
    for i, text in enumerate(prompts):
        if not text:
            raise ConfigError(f"prompt {i}: empty text")
    ids = [tokenizer.encode(text).ids for text in prompts]
    if eos_id is None and stop_at_eos:
        eos_id = next((tokenizer.token_to_id(t) for t in EOS_CANDIDATES if tokenizer.token_to_id(t) is not None),
                      None)
    tokens, stats = generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed, cache_dtype,
                                 prefill_chunk, eos_id if stop_at_eos else None, on_step)
    return Generation(tokens, [tokenizer.decode(t) for t in tokens], stats)
