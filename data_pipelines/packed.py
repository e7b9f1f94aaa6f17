"""Packing: documents (each followed by EOS) are concatenated and cut into fixed-length training sequences.

Each emitted sequence holds seq_len + 1 tokens: inputs = [:-1], labels = [1:]. The last token of a sequence is
also the first token of the next one, so every token of the stream is a label exactly once and nothing is lost
or duplicated. A document longer than the room left continues in the next sequence.

With every sequence come, for its S = seq_len input positions:
  doc_ids   [S]  index of the document segment within this sequence (0, 1, 2, ...); a document's EOS belongs
                 to that document.
  positions [S]  position within that segment, 0 at each document start AND at the start of the sequence: a
                 document continued from the previous sequence restarts at 0, because attention over this
                 sequence cannot see its earlier part (it is a new context, as if run separately).
  labels    [S]  the next token, or IGNORE_INDEX where the label is masked: a document given with a loss mask
                 (a `TokenDocument`, data_pipelines/recall.py) trains only on the tokens its mask keeps, and its EOS
                 then gets no loss either (it is no answer); a plain text document keeps every label.

Also here: the bundled corpus format (documents separated by `<|doc|>` lines) and the bundled paths.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

import torch

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED_CORPUS = BUNDLED_DIR / "corpus.txt.gz"
BUNDLED_TOKENIZER = BUNDLED_DIR / "tokenizer.json"
DOC_SEPARATOR = "<|doc|>"
EOS_TOKEN = "<|endoftext|>"
IGNORE_INDEX = -100  # labels no loss is taken on: the model's ignore index (data knows no model, so it is set here)


class DataError(RuntimeError):
    """Data cannot be read or resumed. The message names the key, file or rank, and what to do."""


def read_documents(path: Path, key: str = "data.path") -> list[str]:
    """Documents of a .txt or .txt.gz file, separated by lines holding exactly <|doc|>."""
    if path.is_dir():
        raise DataError(f"{key}: {path} is a directory; give one .txt or .txt.gz file (documents separated by lines "
                        f"holding {DOC_SEPARATOR}), or read the directory's files with data=jsonl_example "
                        f"data.sources.0.path='{path}/*.jsonl' (or *.parquet, *.txt)")
    if not path.is_file():
        raise DataError(f"{key}: file not found: {path}")
    kind = next((k for ext, k in _NOT_BUNDLED.items() if path.name.lower().endswith(ext)), None)
    if kind is not None:
        raise _not_bundled(path, key, kind)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"{key}: cannot read {path}: {e}") from None
    if _looks_like_json_lines(text):
        raise _not_bundled(path, key, "JSON lines")
    docs: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip() == DOC_SEPARATOR:
            docs.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    docs.append("\n".join(current).strip())
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"{key}: {path} holds no text")
    return docs


_NOT_BUNDLED = {ext: kind for kind, exts in {"JSON lines": (".jsonl", ".jsonl.gz", ".ndjson"),
                                             "JSON": (".json", ".json.gz"), "parquet": (".parquet",)}.items()
                for ext in exts}


def _looks_like_json_lines(text: str) -> bool:
    """The first (up to 3) non-empty lines are each a JSON object: a JSON-lines file, whatever its name."""
    head = []
    for line in io.StringIO(text):  # lazily: a corpus can be large
        if line.strip():
            head.append(line.strip())
            if len(head) == 3:
                break
    if not head or not all(line.startswith("{") and line.endswith("}") for line in head):
        return False
    try:
        return all(isinstance(json.loads(line), dict) for line in head)
    except json.JSONDecodeError:
        return False


def _not_bundled(path: Path, key: str, kind: str) -> DataError:
    """A JSON / parquet file given where a <|doc|>-separated text file belongs: its raw JSON would be the text."""
    if key == "data.path":
        how = (f"read it as a files source instead: python train.py data=jsonl_example "
               f"data.sources.0.path='{path}' (data.sources.0.text_field names the field holding the text; "
               "drop data.path)")
    else:
        how = f"make it a files source ({key.rsplit('.', 1)[0]}.kind=files, with text_field naming the text field)"
    return DataError(f"{key}={path}: a {kind} file, but {key} takes one text file whose documents are separated by "
                     f"lines holding {DOC_SEPARATOR} (its raw {kind} would be trained on as text); {how}")


def split_every_nth(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation): every stride-th document is held out. Corpora are often grouped by source, so a
    tail would not do."""
    n_val = max(1, int(len(docs) * val_fraction)) if len(docs) > 1 else 0
    stride = len(docs) // n_val if n_val else len(docs) + 1
    val_ids = set(range(stride - 1, len(docs), stride)[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val


class Packer:
    """Token buffer that turns documents into sequences of seq_len + 1 tokens with document ids and positions.

    State (JSON-able, part of each rank's resumable data state): the buffered tokens not yet emitted, which of
    them start a document, and which of them have a masked label (`masked`; a state without it masks nothing)."""

    def __init__(self, seq_len: int, state: dict[str, Any] | None = None) -> None:
        self.seq_len = seq_len
        self.tokens: list[int] = list(state["tokens"]) if state else []
        self.doc_starts: list[int] = list(state["doc_starts"]) if state else []  # indices into self.tokens
        # indices into self.tokens whose label (as the target of the position before them) is ignored
        self.masked: list[int] = list(state.get("masked", [])) if state else []
        # [answer, source] token indices of answers not yet emitted: an answer whose source is cut off into an
        # earlier sequence cannot be recalled there, so it loses its label when that happens
        self.recalls: list[list[int]] = [list(r) for r in state.get("recalls", [])] if state else []

    def needs_more(self) -> bool:
        return len(self.tokens) < self.seq_len + 1

    def add_document(self, ids: list[int], eos_id: int, loss_mask: list[bool] | None = None,
                     recalls: list[tuple[int, int]] | None = None) -> None:
        """Append one document's tokens and its EOS. loss_mask[i] False: token i is no label. A document whose
        mask drops any token is trained on its kept tokens only, so its EOS gets no loss either; a plain document
        (no mask, or one keeping every token) keeps every label, EOS included. recalls: (answer, source) token
        indices of the document; an answer whose source ends up in an earlier sequence than itself is masked."""
        start = len(self.tokens)
        if loss_mask is not None and len(loss_mask) != len(ids):
            raise ValueError(f"Packer: a loss mask of {len(loss_mask)} for a document of {len(ids)} tokens")
        self.doc_starts.append(start)
        self.tokens.extend(ids)
        self.tokens.append(eos_id)
        if loss_mask is not None and not all(loss_mask):
            self.masked.extend(start + i for i, keep in enumerate(loss_mask) if not keep)
            self.masked.append(start + len(ids))  # the EOS
        self.recalls.extend([start + answer, start + source] for answer, source in recalls or ())

    def pop_raw(self) -> dict[str, list[int]]:
        """The next sequence as plain lists: tokens [S + 1], the document starts among its S inputs, and the
        masked tokens among its S labels (indices 1..S into tokens: token j is label j - 1)."""
        n = self.seq_len
        if self.needs_more():
            raise ValueError(f"Packer: {len(self.tokens)} tokens buffered, a sequence needs {n + 1}")
        # this sequence's inputs are tokens 0..n-1: an answer among its labels (1..n) whose source lies before
        # token 0 was cut off (the earlier sequence held it)
        self.masked += [a for a, src in self.recalls if 1 <= a <= n and src < 0]
        raw = {"tokens": self.tokens[: n + 1], "doc_starts": [s for s in self.doc_starts if s < n],
               "masked": [m for m in self.masked if 1 <= m <= n]}
        # keep the last token: it is the next sequence's first input (and this sequence's last label, so its mask
        # is spent: index 0 is never a label)
        self.tokens = self.tokens[n:]
        self.doc_starts = [s - n for s in self.doc_starts if s >= n]
        self.masked = [m - n for m in self.masked if m > n]
        self.recalls = [[a - n, src - n] for a, src in self.recalls if a > n]
        return raw

    def pop_sequence(self) -> dict[str, torch.Tensor]:
        """The next sequence -> input_ids, labels, doc_ids, positions, each [S]. Needs not needs_more()."""
        return sequence_tensors(self.pop_raw())

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "doc_starts": list(self.doc_starts), "masked": list(self.masked),
                "recalls": [list(r) for r in self.recalls]}


def sequence_tensors(raw: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """input_ids, labels, doc_ids, positions [S] from tokens [S + 1], the document starts and the masked tokens
    (a raw sequence without `masked`, from an older state, masks nothing)."""
    window = torch.tensor(raw["tokens"], dtype=torch.long)  # [S + 1]
    n = len(window) - 1
    starts = torch.zeros(n, dtype=torch.bool)  # [S] a new segment starts here
    starts[0] = True
    starts[torch.tensor(raw["doc_starts"], dtype=torch.long)] = True
    doc_ids = torch.cumsum(starts.long(), 0) - 1  # [S]
    index = torch.arange(n)
    segment_start = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), 0).values
    positions = index - segment_start  # [S]
    labels = window[1:].clone()  # [S]
    masked = raw.get("masked")
    if masked:
        labels[torch.tensor(masked, dtype=torch.long) - 1] = IGNORE_INDEX
    return {"input_ids": window[:-1], "labels": labels, "doc_ids": doc_ids, "positions": positions}
