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

Also here: the bundled corpus format (documents separated by `<|doc|>` lines) and the bundled paths.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import torch

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED_CORPUS = BUNDLED_DIR / "corpus.txt.gz"
BUNDLED_TOKENIZER = BUNDLED_DIR / "tokenizer.json"
DOC_SEPARATOR = "<|doc|>"
EOS_TOKEN = "<|endoftext|>"


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
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"{key}: cannot read {path}: {e}") from None
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

    State (JSON-able, part of each rank's resumable data state): the buffered tokens not yet emitted and which
    of them start a document."""

    def __init__(self, seq_len: int, state: dict[str, Any] | None = None) -> None:
        self.seq_len = seq_len
        self.tokens: list[int] = list(state["tokens"]) if state else []
        self.doc_starts: list[int] = list(state["doc_starts"]) if state else []  # indices into self.tokens

    def needs_more(self) -> bool:
        return len(self.tokens) < self.seq_len + 1

    def add_document(self, ids: list[int], eos_id: int) -> None:
        """Append one document's tokens and its EOS."""
        self.doc_starts.append(len(self.tokens))
        self.tokens.extend(ids)
        self.tokens.append(eos_id)

    def pop_raw(self) -> dict[str, list[int]]:
        """The next sequence as plain lists: tokens [S + 1] and the document starts among its S inputs."""
        n = self.seq_len
        if self.needs_more():
            raise ValueError(f"Packer: {len(self.tokens)} tokens buffered, a sequence needs {n + 1}")
        raw = {"tokens": self.tokens[: n + 1], "doc_starts": [s for s in self.doc_starts if s < n]}
        # keep the last token: it is the next sequence's first input (and this sequence's last label)
        self.tokens = self.tokens[n:]
        self.doc_starts = [s - n for s in self.doc_starts if s >= n]
        return raw

    def pop_sequence(self) -> dict[str, torch.Tensor]:
        """The next sequence -> input_ids, labels, doc_ids, positions, each [S]. Needs not needs_more()."""
        return sequence_tensors(self.pop_raw())

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "doc_starts": list(self.doc_starts)}


def sequence_tensors(raw: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """input_ids, labels, doc_ids, positions [S] from tokens [S + 1] and the document starts."""
    window = torch.tensor(raw["tokens"], dtype=torch.long)  # [S + 1]
    n = len(window) - 1
    starts = torch.zeros(n, dtype=torch.bool)  # [S] a new segment starts here
    starts[0] = True
    starts[torch.tensor(raw["doc_starts"], dtype=torch.long)] = True
    doc_ids = torch.cumsum(starts.long(), 0) - 1  # [S]
    index = torch.arange(n)
    segment_start = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), 0).values
    positions = index - segment_start  # [S]
    return {"input_ids": window[:-1], "labels": window[1:], "doc_ids": doc_ids, "positions": positions}
