"""Document sources: local json/jsonl/parquet/text files (globs), Hugging Face Hub datasets, the bundled corpus.

Every source is read with `datasets` in streaming mode and split across data-parallel "lanes" with
`split_dataset_by_node` (a lane is one DataLoader worker of one DP rank; see pipeline.py). A `DocumentStream`
yields one lane's documents as text, loops over epochs for training, skips bad rows (counted) and resumes
exactly from `IterableDataset.state_dict()` -- never by skipping N samples.

Training order: the bundled corpus is reshuffled by document every epoch; file sources (data.shuffle_files,
default on) read their files (shards) in a new order every epoch, seeded by (seed, epoch) so every rank and lane
agrees and a resume reproduces it; rows within a file stay in file order (the lanes' sequence pools mix them).
Hub datasets are read in the order the Hub serves them. Passkey sources (data_pipelines/passkey.py) generate
synthetic retrieval documents over bundled-corpus filler, seeded per lane; recall sources (data_pipelines/recall.py)
generate copy / MQAR / passkey documents of recall symbols as token ids with a loss mask, seeded per lane.

Held-out validation documents:
  bundled      every Nth document (N = 1 / data.val_fraction), as the corpus is read whole anyway;
  files        `val_path` files if given, else documents whose text hash falls in data.val_fraction;
  hub          documents whose text hash falls in data.val_fraction;
  passkey      a fixed set of `passkey.val_documents` documents over the held-out bundled documents;
  recall       a fixed set of `recall.val_documents` documents from a seed stream of their own.
A hash split needs no document index (which streaming across shards and ranks does not give), is the same on
every rank and after any resume, and never changes which documents train.

JSON files are JSON lines (one object per line). They are read through the `text` builder and parsed here, row
by row, so one malformed line is skipped and counted instead of failing the whole file (the `json` builder
parses whole chunks).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.config import recall_spec
from data_pipelines.corpus import bundled_split
from data_pipelines.packed import BUNDLED_CORPUS, DOC_SEPARATOR, DataError, read_documents
from data_pipelines.passkey import PasskeySpec, PasskeyStream
from data_pipelines.recall import RecallSpec, RecallStream

FORMAT_OF_SUFFIX = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".txt": "text",
                    ".text": "text", ".md": "text"}
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
SKIP_KINDS = ("malformed", "missing_field", "empty")
HASH_BUCKETS = 1_000_000


@dataclass(frozen=True)
class SourceSpec:
    """A resolved, checked source: plain values only, so it pickles into DataLoader workers."""
    index: int
    key: str  # config key for messages, e.g. "data.sources[1]" or "data.path"
    name: str
    kind: str  # bundled | files | hub | passkey | recall
    format: str  # bundled | json | parquet | text | hub | passkey | recall
    files: tuple[str, ...] = ()
    val_files: tuple[str, ...] = ()
    sample_by: str = "document"
    hub: str | None = None
    hub_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    weight: float = 1.0
    passkey: PasskeySpec | None = None  # passkey: its settings (files[0] is the filler corpus)
    recall: RecallSpec | None = None  # recall: its settings

    def describe(self) -> str:
        if self.kind == "passkey":
            p = self.passkey
            return f"{self.name} (passkey, {p.digits} digits, {p.min_tokens}-{p.max_tokens} tokens)"
        if self.kind == "recall":
            r = self.recall
            gap = f"{r.gap}-{r.gap_max}" if r.gap_max is not None else f"{r.gap}"
            return f"{self.name} (recall {r.task}, {r.items} items, gap {gap})"
        if self.kind == "hub":
            return f"{self.name} (hub {self.hub}{'/' + self.hub_config if self.hub_config else ''}:{self.split})"
        if self.kind == "bundled":
            return f"{self.name} ({Path(self.files[0]).name})"
        return f"{self.name} ({len(self.files)} {self.format} file{'s' if len(self.files) > 1 else ''})"


# ---------------------------------------------------------------- resolving and checking (before training)

def resolve_sources(data: Any, warn=None) -> list[SourceSpec]:
    """Check every source of a DataConfig before training: files exist and open, formats are known, Hub
    datasets resolve. Raises DataError naming the key and file; `warn(message)` gets what trains but likely not as
    meant (a data.path file that holds one document)."""
    if not data.sources:
        path = Path(data.path) if data.path else BUNDLED_CORPUS
        docs = read_documents(path, "data.path")  # raises, naming data.path, if missing or unreadable
        if len(docs) == 1 and warn is not None:
            warn(one_document_warning(path, "data.path"))
        return [SourceSpec(0, "data.path", "bundled", "bundled", "bundled", files=(str(path),))]
    specs = []
    for i, src in enumerate(data.sources):
        key = f"data.sources[{i}]"
        if src.kind == "bundled":
            path = Path(src.path) if src.path else BUNDLED_CORPUS
            read_documents(path, f"{key}.path")
            specs.append(SourceSpec(i, key, src.name or f"bundled{i}", "bundled", "bundled", files=(str(path),),
                                    weight=float(src.weight)))
        elif src.kind == "passkey":
            path = Path(src.path) if src.path else BUNDLED_CORPUS
            read_documents(path, f"{key}.path")
            p = src.passkey
            specs.append(SourceSpec(i, key, src.name or f"passkey{i}", "passkey", "passkey", files=(str(path),),
                                    weight=float(src.weight),
                                    passkey=PasskeySpec(int(p.digits), int(p.min_tokens), int(p.max_tokens),
                                                        int(p.val_documents))))
        elif src.kind == "recall":
            recall = recall_spec(src.recall)
            recall.check(f"{key}.recall")  # also when prepare_data is called without the config checks
            specs.append(SourceSpec(i, key, src.name or f"recall{i}", "recall", "recall", weight=float(src.weight),
                                    recall=recall))
        elif src.kind == "files":
            files = expand_globs(src.path, f"{key}.path")
            fmt = file_format(files, src.format, f"{key}.format")
            val_files: tuple[str, ...] = ()
            if src.val_path is not None:
                val_files = expand_globs(src.val_path, f"{key}.val_path")
                if file_format(val_files, src.format, f"{key}.format") != fmt:
                    raise DataError(f"{key}.val_path: held-out files must have the format of {key}.path ({fmt})")
                overlap = sorted(set(files) & set(val_files))
                if overlap:
                    raise DataError(f"{key}.val_path: {overlap[0]} is also a training file of {key}.path")
            for f in files + val_files:
                check_file(f, fmt, key, src.text_field)
            specs.append(SourceSpec(i, key, src.name or f"{Path(files[0]).stem}{i}", "files", fmt, files=files,
                                    val_files=val_files, sample_by=src.sample_by, text_field=src.text_field,
                                    weight=float(src.weight)))
        else:
            spec = SourceSpec(i, key, src.name or f"{src.hub.split('/')[-1]}{i}", "hub", "hub", hub=src.hub,
                              hub_config=src.hub_config, split=src.split, text_field=src.text_field,
                              weight=float(src.weight))
            open_dataset(spec, "train")  # resolves the dataset's files now: offline or unknown names stop here
            specs.append(spec)
    return specs


def one_document_warning(path: Path, key: str) -> str:
    return (f"warning: {key}={path} holds one document: it has no line holding exactly {DOC_SEPARATOR}, so it "
            "trains as one long document and nothing of it can be held out for validation (no validation loss). "
            f"Put a line holding only {DOC_SEPARATOR} between documents, or read it as plain text split at blank "
            f"lines: data=jsonl_example data.sources.0.path='{path}' data.sources.0.sample_by=paragraph (drop "
            f"{key})")


def expand_globs(value: Any, key: str) -> tuple[str, ...]:
    """Sorted files matching a glob or list of globs; each glob must match at least one file."""
    patterns = [value] if isinstance(value, str) else list(value)
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(str(Path(pattern).expanduser()), recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"{key}: no file matches {pattern!r}")
        files.extend(m for m in matches if m not in files)
    return tuple(files)


def _suffixes(path: str) -> tuple[str, str | None]:
    """(format suffix, compression suffix or None) of a file name."""
    p = Path(path)
    if p.suffix in COMPRESSIONS or p.suffix in (".zst", ".zstd"):
        return Path(p.stem).suffix, p.suffix
    return p.suffix, None


def file_format(files: tuple[str, ...], fmt: str, key: str) -> str:
    if fmt != "auto":
        return fmt
    found = set()
    for f in files:
        suffix, _ = _suffixes(f)
        if suffix not in FORMAT_OF_SUFFIX:
            raise DataError(f"{key}: cannot tell the format of {f} from its name; set {key} to json, parquet or text")
        found.add(FORMAT_OF_SUFFIX[suffix])
    if len(found) > 1:
        raise DataError(f"{key}: the files mix formats ({', '.join(sorted(found))}); use one source per format")
    return found.pop()


def check_file(path: str, fmt: str, key: str, text_field: str) -> None:
    """Open a file and read its start, so an unreadable shard stops the run before training, naming it."""
    suffix, compression = _suffixes(path)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq  # pyarrow: ~0.2 s to import, and only parquet sources need it

            names = pq.ParquetFile(path).schema_arrow.names
            if text_field not in names:
                raise DataError(f"{key}.text_field={text_field!r}: no such column in {path} "
                                f"(columns: {', '.join(names[:20])})")
            return
        opener = COMPRESSIONS.get(compression or "", open)
        with opener(path, "rb") as f:
            head = f.read(1 << 16)
        if fmt == "json" and head.lstrip()[:1] == b"[":
            raise DataError(f"{key}.path: {path} is a JSON array; give JSON lines (one object per line), "
                            "e.g. `jq -c '.[]' in.json > out.jsonl`")
        if fmt == "json":
            _check_text_field(head, path, key, text_field)
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            if len(head) < (1 << 16) or e.start < len(head) - 4:  # not just a character cut at the 64 KiB mark
                raise
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(f"{key}.path: {path} is not UTF-8 text ({e})") from None
    except Exception as e:  # OSError, gzip.BadGzipFile, lzma.LZMAError, pyarrow.ArrowInvalid, ...
        raise DataError(f"{key}.path: cannot read {path}: {type(e).__name__}: {e}") from None


def _check_text_field(head: bytes, path: str, key: str, text_field: str) -> None:
    """JSON lines whose first rows all lack a string `text_field`: stop before training, naming the field and the
    keys the rows have (a few such rows among good ones are skipped and counted while training)."""
    lines = head.decode("utf-8", errors="ignore").splitlines()
    if len(head) >= 1 << 16:
        lines = lines[:-1]  # cut at the 64 KiB mark
    rows = []
    for line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    if not rows or any(isinstance(row.get(text_field), str) for row in rows):
        return
    with_field = [row for row in rows if text_field in row]
    found = sorted({k for row in rows for k in row})
    why = (f"is a {type(with_field[0][text_field]).__name__}, not a string," if with_field else "is missing")
    raise DataError(f"{key}.text_field={text_field!r}: the field {why} in every one of the first {len(rows)} rows "
                    f"of {path} (keys found: {', '.join(found[:20])}); set {key}.text_field to the key holding the "
                    "text")


# ---------------------------------------------------------------- opening a source as a streaming dataset

def epoch_file_order(num_files: int, seed: int, epoch: int) -> list[int]:
    """The order a source's files are read in this training epoch: seeded by (seed, epoch), so it is the same on
    every rank and lane (they split the reordered shards between them) and after a resume (the epoch is saved)."""
    return np.random.default_rng([seed, epoch, 7]).permutation(num_files).tolist()


def open_dataset(spec: SourceSpec, split: str, *, epoch: int = 0, seed: int = 0, val_fraction: float = 0.02,
                 shuffle_files: bool = False) -> Any:
    """The source as a `datasets.IterableDataset` of rows (not yet split by lane). shuffle_files: training reads
    the files (shards) in epoch_file_order; rows within a file keep their order."""
    # datasets: ~1 s to import (pandas, pyarrow), and `import data_pipelines` also serves loading a model's tokenizer
    # (dsv4.loading, for inference and export), which never opens a streaming source
    import datasets

    if spec.kind == "bundled":
        train, val = bundled_split(spec.files[0], val_fraction)
        docs = list(val or train[-1:]) if split == "val" else list(train)
        if split == "train":  # a seeded document order per epoch; the same on every rank and after resume
            order = np.random.default_rng([seed, epoch]).permutation(len(docs))
            docs = [docs[i] for i in order]
        return datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset(num_shards=min(16, len(docs)))
    try:
        if spec.kind == "hub":
            return datasets.load_dataset(spec.hub, spec.hub_config, split=spec.split, streaming=True)
        files = list(spec.val_files if split == "val" and spec.val_files else spec.files)
        if split == "train" and shuffle_files and len(files) > 1:
            files = [files[i] for i in epoch_file_order(len(files), seed, epoch)]
        if spec.format == "parquet":
            return datasets.load_dataset("parquet", data_files={"train": files}, split="train", streaming=True,
                                         columns=[spec.text_field])
        # json lines are parsed here row by row (see the module docstring); text files by the text builder
        sample_by = "line" if spec.format == "json" else spec.sample_by
        return datasets.load_dataset("text", data_files={"train": files}, split="train", streaming=True,
                                     sample_by=sample_by)
    except Exception as e:
        what = f"hub dataset {spec.hub!r}" if spec.kind == "hub" else f"{len(spec.files)} file(s) {spec.files[0]}..."
        hint = (" Hub datasets need network access: unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE."
                if spec.kind == "hub" else "")
        raise DataError(f"{spec.key} ({spec.name}): cannot open {what}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300] if str(e) else ''}.{hint}") from None


def is_held_out(text: str, val_fraction: float) -> bool:
    """Stable hash split: the same answer on every rank, worker and run."""
    return zlib.crc32(text.encode("utf-8")) % HASH_BUCKETS < val_fraction * HASH_BUCKETS


def open_stream(spec: SourceSpec, split: str, lane: int, num_lanes: int, *, seed: int, val_fraction: float,
                on_bad_row: str, shuffle_files: bool = False, state: dict[str, Any] | None = None,
                tokenizer: Any = None) -> DocumentStream | PasskeyStream | RecallStream:
    """The document stream of one source for one lane: generated passkey or recall documents, or a DocumentStream.
    The generated ones take the tokenizer (passkey: its filler text; recall: the ids of its symbols)."""
    if spec.kind == "recall":
        return RecallStream(spec, split, lane, num_lanes, seed=seed, tokenizer=tokenizer, state=state)
    if spec.kind == "passkey":
        return PasskeyStream(spec, split, lane, num_lanes, seed=seed, val_fraction=val_fraction,
                             tokenizer=tokenizer, state=state)
    return DocumentStream(spec, split, lane, num_lanes, seed=seed, val_fraction=val_fraction, on_bad_row=on_bad_row,
                          shuffle_files=shuffle_files, state=state)


class DocumentStream:
    """One source's documents for one lane, as text. Train: loops over epochs. Val: one pass.

    State (JSON-able): epoch, the `datasets` stream state within the epoch, documents read this epoch, and the
    counts of skipped rows by kind."""

    def __init__(self, spec: SourceSpec, split: str, lane: int, num_lanes: int, *, seed: int, val_fraction: float,
                 on_bad_row: str, shuffle_files: bool = False, state: dict[str, Any] | None = None) -> None:
        self.spec, self.split, self.lane, self.num_lanes = spec, split, lane, num_lanes
        self.shuffle_files = shuffle_files
        self.seed, self.val_fraction, self.on_bad_row = seed, val_fraction, on_bad_row
        state = state or {}
        self.epoch: int = state.get("epoch", 0)
        self.epoch_docs: int = state.get("epoch_docs", 0)
        self.skipped: dict[str, int] = {k: int(state.get("skipped", {}).get(k, 0)) for k in SKIP_KINDS}
        self.first_skipped: str | None = None  # what the first skipped row of this process looked like
        self._resume_hf: dict | None = state.get("hf")
        self._dataset: Any = None
        self._rows: Iterator[dict] | None = None
        self.exhausted = False
        # hash split applies unless the bundled corpus (index split) or held-out files define validation
        self._hash_split = spec.kind != "bundled" and not spec.val_files

    def _open(self) -> None:
        from datasets.distributed import split_dataset_by_node  # datasets: heavy, as in open_dataset

        ds = open_dataset(self.spec, self.split, epoch=self.epoch, seed=self.seed, val_fraction=self.val_fraction,
                          shuffle_files=self.shuffle_files)
        ds = split_dataset_by_node(ds, rank=self.lane, world_size=self.num_lanes)
        if self._resume_hf is not None:
            ds.load_state_dict(self._resume_hf)
            self._resume_hf = None
        self._dataset = ds
        # .iter() rather than iter(ds): inside a DataLoader worker, iter(ds) would re-shard by worker itself
        self._rows = ds.iter(batch_size=1)

    def next_document(self) -> str | None:
        """The next document's text; None when a validation pass is over."""
        while True:
            if self._rows is None:
                self._open()
            try:
                batch = next(self._rows)
            except StopIteration:
                if self.split == "val":
                    self.exhausted = True
                    return None
                if self.epoch_docs == 0:
                    raise DataError(f"{self.spec.key} ({self.spec.name}): data lane {self.lane} of {self.num_lanes} "
                                    f"got no usable document in epoch {self.epoch} (skipped: {self.skipped}"
                                    f"{'; first: ' + self.first_skipped if self.first_skipped else ''}); "
                                    "the source is empty or too small for this many ranks x data.num_workers") from None
                self.epoch, self.epoch_docs, self._rows, self._dataset = self.epoch + 1, 0, None, None
                continue
            except DataError:
                raise
            except Exception as e:  # a shard that breaks mid-stream
                raise DataError(f"{self.spec.key} ({self.spec.name}): reading failed in epoch {self.epoch} "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})") from None
            row = {k: v[0] for k, v in batch.items()}
            text = self._text_of(row)
            if text is None:
                continue
            if self._hash_split and is_held_out(text, self.val_fraction) != (self.split == "val"):
                continue
            self.epoch_docs += 1
            return text

    def _bad(self, kind: str, detail: str) -> None:
        if self.on_bad_row == "raise":
            raise DataError(f"{self.spec.key} ({self.spec.name}): {detail}; set data.on_bad_row=skip to skip "
                            "and count such rows")
        self.skipped[kind] += 1
        self.first_skipped = self.first_skipped or detail

    def _text_of(self, row: dict) -> str | None:
        """The document text of a row, or None (counted) for a malformed, text-less or empty row."""
        if self.spec.format == "json":
            line = row.get("text") or ""
            if not line.strip():
                return None  # blank line between JSON lines: not a row
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                self._bad("malformed", f"malformed JSON line ({e.msg}): {line[:80]!r}")
                return None
            if not isinstance(obj, dict):
                self._bad("malformed", f"JSON line is not an object: {line[:80]!r}")
                return None
            row = obj
        field = "text" if self.spec.format in ("bundled", "text") else self.spec.text_field
        text = row.get(field)
        if not isinstance(text, str):
            what = "without" if field not in row else f"whose {field!r} is a {type(text).__name__}, not a string; a"
            self._bad("missing_field", f"row {what} text field {field!r} (keys: {', '.join(list(row)[:10])}; "
                                       f"{self.spec.key}.text_field names it)")
            return None
        if not text.strip():
            self.skipped["empty"] += 1  # empty documents are always skipped
            return None
        return text

    def state_dict(self) -> dict[str, Any]:
        hf = self._dataset.state_dict() if self._dataset is not None else self._resume_hf
        return {"epoch": self.epoch, "epoch_docs": self.epoch_docs, "hf": hf, "skipped": dict(self.skipped)}
