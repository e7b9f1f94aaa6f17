"""Greedy decoding: the single place where evaluation generates tokens.

Every task that decodes (passkey, the lm-eval backend's generate_until) calls `greedy_continue`. It runs a full
forward over prompt + generated tokens at every step (no KV cache); swap in the KV cache of dsv4.inference here
and every task uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def greedy_continue(model: torch.nn.Module, prompts: Sequence[Sequence[int]], n_new: int, eos_id: int | None = None,
                    batch_size: int = 16) -> list[list[int]]:
    """The `n_new` tokens greedy decoding appends to each prompt (fewer when `eos_id` is given: a continuation stops
    after its first EOS). Prompts of equal length are decoded together, `batch_size` at a time."""
    results: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"greedy_continue: prompt {i} is empty (give at least one token, e.g. the EOS id)")
        by_length.setdefault(len(prompt), []).append(i)
    device = next(model.parameters()).device
    for length, members in by_length.items():
        for first in range(0, len(members), batch_size):
            group = members[first: first + batch_size]
            ids = torch.tensor([list(prompts[i]) for i in group], dtype=torch.long, device=device)  # [b, L]
            done = torch.zeros(len(group), dtype=torch.bool, device=device)
            for _ in range(n_new):
                next_ids = model(ids)[:, -1].argmax(dim=-1)  # [b]
                ids = torch.cat([ids, next_ids[:, None]], dim=1)
                if eos_id is not None:
                    done |= next_ids == eos_id
                    if bool(done.all()):
                        break
            for row, i in enumerate(group):
                out = ids[row, length:].tolist()
                if eos_id is not None and eos_id in out:
                    out = out[: out.index(eos_id) + 1]
                results[i] = out
    return results
