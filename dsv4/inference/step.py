"""One forward step of the decoder over new tokens, reading and extending the KV cache.

    logits = forward_step(model, cache, input_ids)     # input_ids [B, T] -> logits [B, T, vocab]

Every sequence continues at its own length (cache.lengths). A step of T > 1 tokens (prefill, or a prompt
appended after decoding) needs every sequence at the same length; a step of one token (decode) does not.
The step is the model's own forward with the cache in place of the plan (dsv4/parallel/plan.py): each layer takes
its earlier rows and entries from its layer cache (dsv4/inference/cache.py), so the result equals the full
forward's: tested at every group and window boundary in tests/test_inference.py.
"""

from __future__ import annotations

import torch

from dsv4.inference.cache import ModelCache


def forward_step(model, cache: ModelCache, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [B, T] continuing each cached sequence -> logits [B, T, vocab]; the cache then holds them too."""
    batch, n_new = input_ids.shape
    if batch != cache.batch:
        raise ValueError(f"forward_step: {batch} sequences for a cache of {cache.batch}")
    if n_new > 1 and bool((cache.lengths != cache.lengths[0]).any()):
        raise ValueError("forward_step: several tokens at once need every sequence at the same length; "
                         "prefill sequences of different lengths one by one and stack their caches")
    logits = model(input_ids, cache=cache)
    cache.lengths = cache.lengths + n_new
    return logits
