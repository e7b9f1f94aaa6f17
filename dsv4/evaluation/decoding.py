"""Greedy decoding: the single place where evaluation generates tokens.

Every task that decodes (passkey, the lm-eval backend's generate_until) calls `greedy_continue`. It decodes with
the compressed KV cache of dsv4.inference (each prompt prefilled once, then one token per step), which equals the
full forward token for token (tests/test_inference.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsv4.inference import generate_ids


@torch.no_grad()
def greedy_continue(model: torch.nn.Module, prompts: Sequence[Sequence[int]], n_new: int, eos_id: int | None = None,
                    batch_size: int = 16) -> list[list[int]]:
    """The `n_new` tokens greedy decoding appends to each prompt (fewer when `eos_id` is given: a continuation stops
    after its first EOS). Prompts (of any lengths) are decoded together, `batch_size` at a time."""
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"greedy_continue: prompt {i} is empty (give at least one token, e.g. the EOS id)")
    results: list[list[int]] = []
    for first in range(0, len(prompts), batch_size):
        group = [list(p) for p in prompts[first: first + batch_size]]
        results += generate_ids(model, group, max_new_tokens=n_new, eos_id=eos_id)[0]
    return results
