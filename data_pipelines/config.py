"""The data config (`data.*` keys): its schema and the checks that need no file, each error naming its key.

`dsv4.training.config` composes it into a run's config; `python -m data_pipelines.inspect` uses it alone. Nothing
here reads a file: sources, tokenizer and EOS are checked by `prepare_data`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from data_pipelines.packed import DataError
from data_pipelines.passkey import PasskeySpec
from data_pipelines.recall import RecallSpec
from data_pipelines.schema import config_schema

SOURCE_KINDS = ("bundled", "files", "hub", "passkey", "recall")
FILE_FORMATS = ("auto", "json", "parquet", "text")


PasskeyConfig = config_schema(
    PasskeySpec, "PasskeyConfig", __name__,
    """kind: passkey -- synthetic retrieval documents (data_pipelines/passkey.py) over bundled-corpus filler.
    Its keys, types and defaults are PasskeySpec's (defined there once, with what each means).""")


RecallConfig = config_schema(
    RecallSpec, "RecallConfig", __name__,
    """kind: recall -- synthetic recall documents (data_pipelines/recall.py), given as token ids with a loss mask.
    Its keys, types and defaults are RecallSpec's (defined there once, with what each means), which checks them.""")


def recall_spec(settings: Any) -> RecallSpec:
    """The RecallSpec of a source's `recall` settings (a RecallConfig, or a config node with its keys)."""
    return RecallSpec(**{f.name: getattr(settings, f.name) for f in fields(RecallSpec)})


@dataclass
class SourceConfig:
    """One data source of a (mixture) stream; `kind` says which keys apply."""
    kind: str = "files"  # bundled (a <|doc|>-separated .txt/.txt.gz) | files (json/jsonl/parquet/text globs) | hub
    #                      | passkey (synthetic key retrieval over the bundled corpus, or `path` in its format)
    #                      | recall (synthetic copy / MQAR / passkey symbol documents, trained on the answers; no path)
    name: str | None = None  # label in logs and proportions; default: derived from path / hub name
    path: Any = None  # files: a glob or list of globs; bundled: a file (null: the bundled corpus)
    format: str = "auto"  # files: auto (from the extension) | json (JSON lines) | parquet | text
    sample_by: str = "document"  # text files: document (a file) | paragraph (blank-line separated) | line
    hub: str | None = None  # hub: dataset name on the Hugging Face Hub (needs network)
    hub_config: str | None = None  # hub: the dataset's config name
    split: str = "train"  # hub: the split to stream
    text_field: str = "text"  # json / parquet / hub: the column holding the document text
    weight: float = 1.0  # mixture weight (relative; proportions of documents)
    val_path: Any = None  # files: held-out files for validation (null: hold out by val_fraction)
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)  # passkey: its settings
    recall: RecallConfig = field(default_factory=RecallConfig)  # recall: its settings


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)  # empty: one bundled source (data.path)
    path: str | None = None  # bundled source: null = the bundled corpus; else a .txt / .txt.gz (<|doc|> separated)
    tokenizer: str | None = None  # null: the bundled tokenizer; a tokenizer.json path; a Hub tokenizer name; or
    #                                recall (the 147 recall symbols, data_pipelines/recall.py; recall sources only)
    eos_token: str | None = None  # null: the first of <|endoftext|>, </s>, <eos>, <|end_of_text|> in the vocab
    val_fraction: float = 0.02  # documents held out for validation (bundled: every Nth; files/hub: by text hash)
    cross_document_attention: bool = True  # false: attention stays inside each packed document
    num_workers: int = 1  # DataLoader worker processes that tokenize and pack (0: in the training process)
    prefetch_factor: int = 4  # micro-batches each worker prepares ahead
    worker_start: str = "forkserver"  # forkserver | spawn | fork (fork breaks under W&B's import hooks)
    shuffle_buffer: int = 256  # packed sequences each worker draws from at random (0: stream order)
    shuffle_files: bool = True  # train: each source's files (shards) read in a new seeded order every epoch
    mix_by: str = "documents"  # what data.sources[*].weight proportions count: documents | tokens
    on_bad_row: str = "skip"  # skip (and count) | raise: malformed rows and rows without the text field
    seed: int | None = None  # mixture and shuffle seed; null: train.seed



def check_data_config(data: DataConfig) -> None:
    """Value ranges and which keys each source kind needs; DataError naming the key."""
    def need(cond: bool, key: str, value: Any, msg: str) -> None:
        if not cond:
            raise DataError(f"{key}={value!r}: {msg}")

    _check_data(data, need)


def _check_data(data: DataConfig, need) -> None:
    """Data keys only: value ranges and which keys each source kind needs (files are checked by the pipeline)."""
    need(0 < data.val_fraction < 0.5, "data.val_fraction", data.val_fraction, "must be in (0, 0.5)")
    need(data.num_workers >= 0, "data.num_workers", data.num_workers, "must be >= 0 (0: no worker processes)")
    need(data.prefetch_factor >= 1, "data.prefetch_factor", data.prefetch_factor, "must be >= 1")
    need(data.worker_start in ("forkserver", "spawn", "fork"), "data.worker_start", data.worker_start,
         "choose forkserver, spawn or fork")
    need(data.shuffle_buffer >= 0, "data.shuffle_buffer", data.shuffle_buffer, "must be >= 0 (0: stream order)")
    need(data.mix_by in ("documents", "tokens"), "data.mix_by", data.mix_by, "must be documents or tokens")
    need(data.on_bad_row in ("skip", "raise"), "data.on_bad_row", data.on_bad_row, "choose skip or raise")
    need(not (data.sources and data.path), "data.path", data.path,
         "set either data.path (one bundled-format file) or data.sources, not both")
    names: set[str] = set()
    for i, src in enumerate(data.sources):
        key = f"data.sources[{i}]"
        need(src.kind in SOURCE_KINDS, f"{key}.kind", src.kind, f"choose one of {', '.join(SOURCE_KINDS)}")
        need(src.weight > 0 and math.isfinite(src.weight), f"{key}.weight", src.weight, "must be > 0")
        need(src.format in FILE_FORMATS, f"{key}.format", src.format, f"choose one of {', '.join(FILE_FORMATS)}")
        need(src.sample_by in ("document", "paragraph", "line"), f"{key}.sample_by", src.sample_by,
             "choose document, paragraph or line")
        need(bool(src.text_field), f"{key}.text_field", src.text_field, "name the column holding the text")
        if src.kind == "files":
            need(_globs(src.path) is not None, f"{key}.path", src.path, "give a file glob or a list of globs")
        if src.kind == "hub":
            need(bool(src.hub), f"{key}.hub", src.hub, "give the dataset's name on the Hub, e.g. 'user/dataset'")
        if src.kind == "passkey":
            _check_passkey(src.passkey, f"{key}.passkey", need)
        if src.kind == "recall":
            need(src.path is None, f"{key}.path", src.path, "a recall source generates its documents: give no path")
            recall_spec(src.recall).check(f"{key}.recall")
        if src.kind != "files":
            need(src.val_path is None, f"{key}.val_path", src.val_path, "only files sources take held-out files")
        if src.val_path is not None:
            need(_globs(src.val_path) is not None, f"{key}.val_path", src.val_path, "give a glob or list of globs")
        name = src.name or f"source{i}"
        need(name not in names, f"{key}.name", src.name, "source names must be unique")
        names.add(name)


def _check_passkey(p: PasskeyConfig, key: str, need) -> None:
    need(1 <= p.digits <= 32, f"{key}.digits", p.digits, "must be in [1, 32]")
    need(p.min_tokens >= 1, f"{key}.min_tokens", p.min_tokens, "must be >= 1")
    need(p.max_tokens >= p.min_tokens, f"{key}.max_tokens", p.max_tokens, f"must be >= min_tokens ({p.min_tokens})")
    need(p.val_documents >= 1, f"{key}.val_documents", p.val_documents, "must be >= 1")


def _globs(value: Any) -> list[str] | None:
    """A glob or a list of globs as a list of non-empty strings, else None."""
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    return None
