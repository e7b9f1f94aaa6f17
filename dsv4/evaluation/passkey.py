"""The passkey retrieval task: can the model read back a key stated far back in its context?

A prompt of exactly L tokens holds filler text (held-out documents of the bundled corpus), the needle (data_pipelines/
passkey.py: "The pass key is K. Remember it. K is the pass key.") at depth d of the filler (0: at the start, 1: right
before the question) and ends with "What is the pass key? The pass key is". Greedy decoding of the answer's length
in tokens is scored against the key: exact (all digits; chance 10^-digits) and per digit (`per_digit`, chance 0.1).

Prompts depend only on the tokenizer, the seed, the lengths, the depths and the count per cell, so every model
with the same tokenizer sees the same prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipelines.passkey import Filler, draw_key, passkey_parts, split_at_depth

DEFAULT_LENGTH_MULTIPLES = (2, 4, 8, 16)  # x the sliding window
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
ContinueFn = Callable[[Sequence[Sequence[int]], int], list[list[int]]]  # (prompts, n_new) -> continuations


@dataclass(frozen=True)
class PasskeyPrompt:
    ids: list[int]  # exactly `length` tokens
    answer: list[int]  # the answer's tokens (" K")
    key: str
    length: int
    depth: float
    needle_start: int  # index of the needle's first token in ids
    needle_len: int


def make_prompt(tokenizer: Any, filler: Filler, rng: np.random.Generator, length: int, depth: float,
                digits: int) -> PasskeyPrompt:
    key = draw_key(rng, digits)
    needle, question, answer = passkey_parts(tokenizer, key)
    num_filler = length - len(needle) - len(question)
    if num_filler < 0:
        raise ValueError(f"passkey length {length}: too short for the needle and question "
                         f"({len(needle) + len(question)} tokens)")
    text = filler.take(rng, num_filler)
    cut = split_at_depth(num_filler, depth)
    ids = text[:cut] + needle + text[cut:] + question
    return PasskeyPrompt(ids, answer, key, length, depth, cut, len(needle))


def passkey_prompts(tokenizer: Any, filler_documents: Sequence[str], lengths: Sequence[int],
                    depths: Sequence[float], per_cell: int, digits: int = 5, seed: int = 0) -> list[PasskeyPrompt]:
    """`per_cell` prompts for every (length, depth), each from its own generator seeded by (seed, cell, index)."""
    filler = Filler(filler_documents, tokenizer)
    prompts = []
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depths):
            for i in range(per_cell):
                rng = np.random.default_rng([seed, li, di, i, int(length)])
                prompts.append(make_prompt(tokenizer, filler, rng, int(length), float(depth), digits))
    return prompts


def score_answer(tokenizer: Any, generated: Sequence[int], key: str) -> tuple[bool, float]:
    """(exact, share of digits right) of a continuation against the key, compared as text."""
    text = tokenizer.decode(list(generated)).strip()
    right = sum(1 for got, want in zip(text, key) if got == want)
    return text[: len(key)] == key, right / len(key)


def _summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"exact": float(np.mean([r["exact"] for r in rows])),
            "per_digit": float(np.mean([r["per_digit"] for r in rows])), "n": len(rows)}


def score_passkey(tokenizer: Any, prompts: Sequence[PasskeyPrompt], continue_fn: ContinueFn) -> dict[str, Any]:
    """Run `continue_fn` (e.g. greedy decoding with a model) on every prompt; accuracy overall, by length, by depth
    and by (length, depth), with the chance levels of guessing."""
    n_new = max(len(p.answer) for p in prompts)
    outputs = continue_fn([p.ids for p in prompts], n_new)
    rows = []
    for prompt, out in zip(prompts, outputs):
        exact, per_digit = score_answer(tokenizer, out[: len(prompt.answer)], prompt.key)
        rows.append({"length": prompt.length, "depth": prompt.depth, "exact": exact, "per_digit": per_digit,
                     "key": prompt.key, "output": tokenizer.decode(list(out))})
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    key_digits = len(prompts[0].key)
    return {
        **_summarise(rows),
        "chance": {"exact": 10.0 ** -key_digits, "per_digit": 0.1},
        "by_length": {str(n): _summarise([r for r in rows if r["length"] == n]) for n in lengths},
        "by_depth": {str(d): _summarise([r for r in rows if r["depth"] == d]) for d in depths},
        "by_length_depth": {f"{n}@{d}": _summarise([r for r in rows if r["length"] == n and r["depth"] == d])
                            for n in lengths for d in depths},
        "samples": rows[:: max(1, len(rows) // 8)],
    }
