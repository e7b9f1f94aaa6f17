"""Synthetic recall documents: tasks where every answer lies a chosen distance back, so that what a model keeps
beyond its attention window can be trained and measured (the copy task of the induction-head literature,
Zoology's multi-query associative recall, and a passkey-like single retrieval).

    copy     s_1 .. s_n  f .. f  <sep>  s_1 .. s_n          answers: the second string (source: the first)
    mqar     k_1 v_1 f f  k_2 v_2 f f ..  f .. f  k_3 v_3  k_1 v_1 ..   answers: each queried value (source: its
             value in the context); `layout: aligned` puts each pair alone at the start of its `group` tokens,
             `packed` writes the pairs back to back; every key is queried once, in random order
    passkey  f .. f  <mark> d_1 .. d_n  f .. f  <mark> d_1 .. d_n     answers: the repeated digits (the needle
             at a random depth of the leading filler)

The gap between the context and the queries is `gap` filler tokens, or uniform in [gap, gap_max]. Filler is one
token (`filler: fixed`) or uniform over 16 filler symbols (`random`). `loss: answers` (the default) gives every
other token of a document no loss, as Zoology trains MQAR; `loss: all` keeps the loss on every token.

Symbols. The recall vocabulary is 64 keys `k0..k63`, 64 values `v0..v63`, 16 fillers `f0..f15`, `<sep>`, `<mark>`
and `<|endoftext|>`: `data.tokenizer: recall` gives a word-level tokenizer of exactly these (147 ids, so a model
needs `model.vocab_size >= 147`), which keeps a recall model small. With any other tokenizer the symbols are
RESERVED IDS: the last 146 ids of its vocabulary that are not special tokens (in id order), so a recall source
mixes with text sources and `python -m dsv4.evaluate RUN --tasks recall` works on any run; those ids are rare
merges in a BPE vocabulary and lose their meaning in text.

`RecallStream` is a source like `DocumentStream` (sources.py): seeded by (seed, lane, split), resumable exactly
from its state (both from SyntheticStream, synthetic.py), and its documents are `TokenDocument`s (ids with a
per-token loss mask) that packing carries.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Any

import numpy as np

from data_pipelines.packed import EOS_TOKEN, DataError
from data_pipelines.synthetic import SyntheticStream

TASKS = ("copy", "mqar", "passkey")
LAYOUTS = ("aligned", "packed")
FILLERS = ("fixed", "random")
LOSSES = ("answers", "all")
MAX_KEYS = MAX_VALUES = 64
NUM_FILLERS = 16
SEP, MARK = "<sep>", "<mark>"


def recall_words() -> list[str]:
    """The recall vocabulary in id order (the recall tokenizer's ids), EOS last."""
    return ([f"k{i}" for i in range(MAX_KEYS)] + [f"v{i}" for i in range(MAX_VALUES)]
            + [f"f{i}" for i in range(NUM_FILLERS)] + [SEP, MARK, EOS_TOKEN])


@dataclass(frozen=True)
class RecallSpec:
    """The settings of a recall source (data.sources[i].recall)."""
    task: str = "mqar"  # copy | mqar | passkey
    items: int = 8  # mqar: key-value pairs; copy: string length; passkey: digits of the key
    num_keys: int = 32  # mqar: key symbols (keys of a document are distinct)
    num_values: int = 16  # values (mqar), string symbols (copy), digit symbols (passkey)
    gap: int = 64  # filler tokens between the context and the queries
    gap_max: int | None = None  # null: always `gap`; else uniform in [gap, gap_max]
    layout: str = "aligned"  # mqar: aligned (each pair alone at the start of its group) | packed (back to back)
    group: int = 4  # mqar aligned: tokens per pair slot (4: one CSA compression group)
    filler: str = "fixed"  # fixed (one filler token) | random (uniform over 16 filler symbols)
    loss: str = "answers"  # answers (loss only on the answer tokens) | all
    val_documents: int = 64  # documents in the validation split (a fixed set; training is endless)

    def as_list(self) -> list[Any]:
        return list(astuple(self))

    def check(self, key: str) -> None:
        """DataError naming `key.<field>` for a value no document can be made with."""
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise DataError(f"{key}.{name}={getattr(self, name)!r}: {msg}")
        need(self.task in TASKS, "task", f"choose from {', '.join(TASKS)}")
        need(self.layout in LAYOUTS, "layout", f"choose from {', '.join(LAYOUTS)}")
        need(self.filler in FILLERS, "filler", f"choose from {', '.join(FILLERS)}")
        need(self.loss in LOSSES, "loss", f"choose from {', '.join(LOSSES)}")
        need(1 <= self.num_keys <= MAX_KEYS, "num_keys", f"must be in 1..{MAX_KEYS}")
        need(2 <= self.num_values <= MAX_VALUES, "num_values", f"must be in 2..{MAX_VALUES}")
        need(self.items >= 1, "items", "must be >= 1")
        need(self.task != "mqar" or self.items <= self.num_keys, "items",
             f"an mqar document's keys are distinct: at most num_keys ({self.num_keys}) pairs")
        need(self.gap >= 0, "gap", "must be >= 0")
        need(self.gap_max is None or self.gap_max >= self.gap, "gap_max", f"must be >= gap ({self.gap}) or null")
        need(self.group >= 2, "group", "must be >= 2 (a key and its value)")
        need(self.val_documents >= 1, "val_documents", "must be >= 1")

    @property
    def max_gap(self) -> int:
        return self.gap if self.gap_max is None else self.gap_max

    def max_tokens(self) -> int:
        """The longest document (without its EOS)."""
        n = self.items
        if self.task == "copy":
            return 2 * n + self.max_gap + 1
        if self.task == "passkey":
            return 2 * (n + 1) + self.max_gap + self.gap
        return n * (self.group if self.layout == "aligned" else 2) + self.max_gap + 2 * n


@dataclass
class TokenDocument:
    """A document given as token ids (no tokenizer pass). loss_mask[i]: token i's label counts (as the label of
    the position before it). answers / sources: the position of every answer token and of the token it
    recalls (the same length)."""
    ids: list[int]
    loss_mask: list[bool]
    answers: list[int]
    sources: list[int]


class Symbols:
    """Token ids of the recall symbols under a tokenizer (see the module docstring)."""

    def __init__(self, tokenizer: Any) -> None:
        words = recall_words()[:-1]  # EOS is the run's own
        vocab = tokenizer.get_vocab()
        if all(w in vocab for w in words):
            ids = [vocab[w] for w in words]
        else:
            special = set(_special_ids(tokenizer))
            free = [i for i in range(tokenizer.get_vocab_size()) if i not in special]
            if len(free) < len(words):
                raise DataError(f"recall: the tokenizer has {len(free)} non-special ids; the recall symbols need "
                                f"{len(words)} (use data.tokenizer=recall)")
            ids = free[-len(words):]
        self.keys = ids[:MAX_KEYS]
        self.values = ids[MAX_KEYS:MAX_KEYS + MAX_VALUES]
        self.fillers = ids[MAX_KEYS + MAX_VALUES:MAX_KEYS + MAX_VALUES + NUM_FILLERS]
        self.sep, self.mark = ids[-2], ids[-1]


def _special_ids(tokenizer: Any) -> list[int]:
    decoder = getattr(tokenizer, "get_added_tokens_decoder", None)
    if decoder is None:
        return []
    return [i for i, tok in decoder().items() if getattr(tok, "special", True)]


def make_document(spec: RecallSpec, symbols: Symbols, rng: np.random.Generator) -> TokenDocument:
    """One document of spec.task, drawn with rng."""
    gap = int(rng.integers(spec.gap, spec.max_gap + 1))
    builder = {"copy": _copy, "mqar": _mqar, "passkey": _passkey}[spec.task]
    ids, answers, sources = builder(spec, symbols, rng, gap)
    answer_set = set(answers)
    mask = [True] * len(ids) if spec.loss == "all" else [i in answer_set for i in range(len(ids))]
    return TokenDocument(ids, mask, answers, sources)


def _filler(spec: RecallSpec, symbols: Symbols, rng: np.random.Generator, n: int) -> list[int]:
    if spec.filler == "fixed":
        return [symbols.fillers[0]] * n
    return [symbols.fillers[int(i)] for i in rng.integers(0, NUM_FILLERS, n)]


def _copy(spec, symbols, rng, gap):
    string = [symbols.values[int(i)] for i in rng.integers(0, spec.num_values, spec.items)]
    ids = string + _filler(spec, symbols, rng, gap) + [symbols.sep] + string
    start = spec.items + gap + 1
    return ids, list(range(start, start + spec.items)), list(range(spec.items))


def _mqar(spec, symbols, rng, gap):
    n = spec.items
    keys = rng.permutation(spec.num_keys)[:n]
    values = rng.integers(0, spec.num_values, n)
    ids: list[int] = []
    value_pos = []
    for k, v in zip(keys, values):
        ids += [symbols.keys[int(k)], symbols.values[int(v)]]
        value_pos.append(len(ids) - 1)
        if spec.layout == "aligned":
            ids += _filler(spec, symbols, rng, spec.group - 2)
    ids += _filler(spec, symbols, rng, gap)
    answers, sources = [], []
    for i in rng.permutation(n):
        ids += [symbols.keys[int(keys[i])], symbols.values[int(values[i])]]
        answers.append(len(ids) - 1)
        sources.append(value_pos[i])
    return ids, answers, sources


def _passkey(spec, symbols, rng, gap):
    digits = [symbols.values[int(i)] for i in rng.integers(0, spec.num_values, spec.items)]
    lead = int(rng.integers(0, spec.gap + 1))  # the needle's depth in the leading filler
    ids = _filler(spec, symbols, rng, lead) + [symbols.mark] + digits
    first = lead + 1
    ids += _filler(spec, symbols, rng, gap) + [symbols.mark] + digits
    start = len(ids) - spec.items
    return ids, list(range(start, start + spec.items)), list(range(first, first + spec.items))


class RecallStream(SyntheticStream):
    """One lane's recall documents (TokenDocuments; seeding, resume and the validation set: SyntheticStream)."""

    kind = "recall"
    seed_salt = 13

    def __init__(self, spec: Any, split: str, lane: int, num_lanes: int, *, seed: int, tokenizer: Any,
                 state: dict[str, Any] | None = None) -> None:
        self.symbols = Symbols(tokenizer)
        super().__init__(spec, split, lane, num_lanes, seed=seed, state=state)

    def make_document(self) -> TokenDocument:
        return make_document(self.settings, self.symbols, self.rng)
