"""Weighted, seeded choice of the source of each next document, with the realised counts.

Weights are relative proportions of DOCUMENTS (by="documents": each document is one draw) or of TOKENS
(by="tokens": a source is drawn with probability weight / its mean document length so far, so long-document
sources are drawn less often and the token shares approach the weights). The realised proportions of both
documents and tokens are reported.
State (JSON-able): the numpy bit generator's state, the counts and which sources are still active (a
validation pass drops a source when it runs out)."""

from __future__ import annotations

from typing import Any

import numpy as np


class Mixture:
    def __init__(self, weights: list[float], seed: list[int], state: dict[str, Any] | None = None,
                 by: str = "documents") -> None:
        if by not in ("documents", "tokens"):
            raise ValueError(f"data.mix_by={by!r}: must be documents or tokens")
        self.weights = np.asarray(weights, dtype=np.float64)
        self.by = by
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
        if self.by == "tokens":  # per-source mean length, each source starting from one document of the overall mean
            docs, tokens = np.asarray(self.docs, dtype=np.float64), np.asarray(self.tokens, dtype=np.float64)
            overall = (tokens.sum() + 1.0) / (docs.sum() + 1.0)
            p = p / ((tokens + overall) / (docs + 1.0))
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
