"""Weighted, seeded choice of the source of each next document, with the realised counts.

Weights are relative proportions of DOCUMENTS (each document is one draw); the realised proportions of both
documents and tokens are reported, since sources with long documents take a larger share of the tokens.
State (JSON-able): the numpy bit generator's state, the counts and which sources are still active (a
validation pass drops a source when it runs out)."""

from __future__ import annotations

from typing import Any

import numpy as np


class Mixture:
    def __init__(self, weights: list[float], seed: list[int], state: dict[str, Any] | None = None) -> None:
        self.weights = np.asarray(weights, dtype=np.float64)
        self.rng = np.random.default_rng(seed)
        n = len(weights)
        self.docs: list[int] = [0] * n
        self.tokens: list[int] = [0] * n
        self.active: list[bool] = [True] * n
        if state:
            self.rng.bit_generator.state = state["rng"]
            self.docs, self.tokens, self.active = list(state["docs"]), list(state["tokens"]), list(state["active"])

    def choose(self) -> int | None:
        """Index of the source of the next document; None when no source is left."""
        p = self.weights * np.asarray(self.active, dtype=np.float64)
        total = p.sum()
        if total <= 0:
            return None
        if len(p) == 1:
            return 0  # no draw: a single source leaves the generator untouched
        u = self.rng.random() * total
        return min(int(np.searchsorted(np.cumsum(p), u, side="right")), len(p) - 1)

    def count(self, index: int, num_tokens: int) -> None:
        self.docs[index] += 1
        self.tokens[index] += num_tokens

    def deactivate(self, index: int) -> None:
        self.active[index] = False

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "docs": list(self.docs), "tokens": list(self.tokens),
                "active": list(self.active)}
