"""An empty validation split, found before training and explained per source.

The held-out set is packed into full sequences of train.seq_len + 1 tokens (a partial one is dropped), so a small
corpus can hold out no sequence at all: a 20-document file at data.val_fraction=0.02 holds out nothing by text
hash. Such a run still trains and checkpoints (a tiny corpus is a fine smoke test); its val_loss is null, and this
module says which source gave how much held-out data and which key to change."""

from __future__ import annotations

from typing import Any

from data_pipelines.sources import open_stream
from data_pipelines.tokenizer import load_tokenizer


def held_out_sizes(plan: Any, seed: int) -> list[tuple[int, int]]:
    """(documents, tokens) in each source's validation split, read whole: only called when that split packs into
    no sequence, so every source's split is smaller than one sequence, or empty."""
    tokenizer = load_tokenizer(plan.tokenizer)
    sizes = []
    for spec in plan.sources:
        stream = open_stream(spec, "val", 0, 1, seed=seed, val_fraction=plan.val_fraction, on_bad_row="skip",
                             tokenizer=tokenizer)
        docs = tokens = 0
        while (document := stream.next_document()) is not None:
            ids = getattr(document, "ids", None)  # generated token documents carry their ids
            if ids is None:
                ids = tokenizer.encode(document, add_special_tokens=False).ids
            docs, tokens = docs + 1, tokens + len(ids) + 1  # + its EOS
        sizes.append((docs, tokens))
    return sizes


def _what_to_change(spec: Any, val_fraction: float) -> str:
    if spec.kind == "files" and spec.val_files:
        return f"add documents to its held-out files ({spec.key}.val_path)"
    if spec.kind == "files":
        return (f"give it held-out files ({spec.key}.val_path=...) or raise data.val_fraction (now {val_fraction:g}; "
                "documents are held out by text hash)")
    if spec.kind == "hub":
        return f"raise data.val_fraction (now {val_fraction:g}; documents are held out by text hash)"
    if spec.kind == "bundled":
        return f"raise data.val_fraction (now {val_fraction:g}) or use a larger corpus"
    return f"raise {spec.key}.{spec.kind}.val_documents"


def empty_validation_warning(plan: Any, sizes: list[tuple[int, int]], seq_len: int) -> str:
    """One warning: no held-out sequence, each source's held-out documents / tokens, and what to change."""
    per_source = "; ".join(f"{spec.key} ({spec.name}): {docs} held-out documents, {tokens} tokens: "
                           f"{_what_to_change(spec, plan.val_fraction)}"
                           for spec, (docs, tokens) in zip(plan.sources, sizes))
    return (f"warning: no validation data: the held-out split packs into no sequence of train.seq_len + 1 = "
            f"{seq_len + 1} tokens, so there is no validation loss (val_loss stays null; the run still trains and "
            f"checkpoints). {per_source}{'; or lower train.seq_len' if any(t for _, t in sizes) else ''}")
