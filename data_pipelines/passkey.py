"""Synthetic passkey documents: filler text holding a random n-digit key at a random depth, ending with the question
and its answer, so that retrieval from far back in the context can be learned (training) and measured (evaluation).

    ... filler ... The pass key is 48213. Remember it. 48213 is the pass key. ... filler ... What is the pass
    key? The pass key is 48213

The filler is real text: slices of the bundled corpus (training documents for training, held-out documents for
validation and evaluation), so the model cannot tell a passkey document by its filler. The same phrasing serves
the training source (`PasskeyStream`, a `data.sources` entry of kind `passkey`) and the evaluation task
(dsv4.evaluation.passkey), which builds its prompts from token ids of exact length.

A `PasskeyStream` behaves like a `DocumentStream` (sources.py): one lane's documents as text, seeded by (seed, lane,
split), and resumes exactly from its state (the generator's state and the count); the state also records the
source's settings, so resuming with other settings stops with a message naming the key (all of it from
SyntheticStream, synthetic.py, which the recall source shares).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipelines.corpus import bundled_split
from data_pipelines.packed import DataError
from data_pipelines.synthetic import SyntheticStream

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"
CHARS_PER_TOKEN = 6  # generous: filler text is cut to this many characters per wanted token, then to tokens


@dataclass(frozen=True)
class PasskeySpec:
    """The settings of a passkey source (data.sources[i].passkey)."""
    digits: int = 5  # key length; the first digit is never 0
    min_tokens: int = 64  # document length in tokens, drawn uniformly from [min_tokens, max_tokens]
    max_tokens: int = 512
    val_documents: int = 32  # documents in the validation split (a fixed set; training is endless)

    def as_list(self) -> list[int]:
        return [self.digits, self.min_tokens, self.max_tokens, self.val_documents]


def draw_key(rng: np.random.Generator, digits: int) -> str:
    """A random `digits`-digit key (no leading zero)."""
    return str(int(rng.integers(1, 10))) + "".join(str(int(d)) for d in rng.integers(0, 10, digits - 1))


class Filler:
    """Token slices of real text taken at random places of a list of documents."""

    def __init__(self, documents: Sequence[str], tokenizer: Any, what: str = "passkey filler") -> None:
        if not documents:
            raise DataError(f"{what}: no documents to take filler text from")
        self.documents, self.tokenizer = documents, tokenizer

    def take(self, rng: np.random.Generator, num_tokens: int) -> list[int]:
        """`num_tokens` token ids of contiguous text, from a random document and character offset (continuing into
        the next documents when one runs out)."""
        if num_tokens <= 0:
            return []
        doc = int(rng.integers(len(self.documents)))
        offset = self.documents[doc].find(" ", int(rng.integers(len(self.documents[doc])))) + 1  # a word start
        ids: list[int] = []
        while len(ids) < num_tokens:
            text = self.documents[doc][offset: offset + CHARS_PER_TOKEN * (num_tokens - len(ids)) + 16]
            ids += self.tokenizer.encode(" " + text.strip(), add_special_tokens=False).ids if text.strip() else []
            doc, offset = (doc + 1) % len(self.documents), 0
        return ids[:num_tokens]


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def passkey_parts(tokenizer: Any, key: str) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the needle (which states the key), the question and the answer for one key."""
    return (encode(tokenizer, NEEDLE.format(key=key)), encode(tokenizer, QUESTION),
            encode(tokenizer, ANSWER.format(key=key)))


def split_at_depth(num_filler: int, depth: float) -> int:
    """How many filler tokens precede the needle at `depth` (0: the needle opens the text, 1: it is right before
    the question)."""
    return int(round(min(max(depth, 0.0), 1.0) * num_filler))


class PasskeyStream(SyntheticStream):
    """One lane's passkey documents, as text (seeding, resume and the validation set: SyntheticStream)."""

    kind = "passkey"
    seed_salt = 11
    settings_layout = " as [digits, min_tokens, max_tokens, val_documents]"

    def __init__(self, spec: Any, split: str, lane: int, num_lanes: int, *, seed: int, val_fraction: float,
                 tokenizer: Any, state: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        train_docs, val_docs = bundled_split(spec.files[0], val_fraction)
        self.filler = Filler(val_docs if split == "val" else train_docs, tokenizer, f"{spec.key}.path")
        super().__init__(spec, split, lane, num_lanes, seed=seed, state=state)

    def make_document(self) -> str:
        """A passkey document's text: filler, the needle at a random depth, more filler, the question, the key."""
        s = self.settings
        length = int(self.rng.integers(s.min_tokens, s.max_tokens + 1))
        depth = float(self.rng.random())
        key = draw_key(self.rng, s.digits)
        needle, question, answer = passkey_parts(self.tokenizer, key)
        num_filler = max(0, length - len(needle) - len(question) - len(answer))
        filler = self.filler.take(self.rng, num_filler)
        cut = split_at_depth(num_filler, depth)
        parts = (self.tokenizer.decode(filler[:cut]), NEEDLE.format(key=key), self.tokenizer.decode(filler[cut:]),
                 QUESTION)
        return " ".join(part.strip() for part in parts if part.strip()) + ANSWER.format(key=key)
