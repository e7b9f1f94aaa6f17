"""Structured configs for a training run: every Hydra group is checked against a dataclass here, so a bad
or unknown value stops the run before training with an error that names the key."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dsv4.config import CSA_RATIO, DENSE, WINDOW, ConfigError, ModelConfig

LAYOUTS = ("window", "csa", "hca", "dense", "v4_flash", "v4_pro")


@dataclass
class AttentionConfig:
    layout: str | None = None  # null: keep model.compress_ratios; else a named schedule (LAYOUTS)
    hca_ratio: int | None = None  # ratio used by layouts for HCA layers (null: the model's, else 128)
    backend: str = "auto"  # auto (triton on CUDA, torch on CPU) | triton | torch | naive
    query_chunk_size: int = 128
    deterministic: bool = True  # Triton backward: fixed-order dK=V instead of fp32 atomics


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    reduce_bucket_size: int = 50_000_000
    overlap_comm: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the DeepSpeed JSON config


SOURCE_KINDS = ("bundled", "files", "hub", "passkey")
FILE_FORMATS = ("auto", "json", "parquet", "text")


@dataclass
class PasskeyConfig:
    """kind: passkey -- synthetic retrieval documents (data_pipelines/passkey.py) over bundled-corpus filler."""
    digits: int = 5  # key length
    min_tokens: int = 64  # document length in tokens, uniform in [min_tokens, max_tokens]
    max_tokens: int = 512
    val_documents: int = 32  # documents in the validation split


@dataclass
class SourceConfig:
    """One data source of a (mixture) stream; `kind` says which keys apply."""
    kind: str = "files"  # bundled (a <|doc|>-separated .txt/.txt.gz) | files (json/jsonl/parquet/text globs) | hub
    #                      | passkey (synthetic key retrieval over the bundled corpus, or `path` in its format)
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


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)  # empty: one bundled source (data.path)
    path: str | None = None  # bundled source: null = the bundled corpus; else a .txt / .txt.gz (<|doc|> separated)
    tokenizer: str | None = None  # null: the bundled tokenizer; a tokenizer.json path; or a Hub tokenizer name
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


@dataclass
class PhaseConfig:
    dense_steps: int = 0  # CSA attends to every visible compressed entry; indexer idle
    indexer_warmup_steps: int = 0  # CSA still dense; indexer learns from the dense KL loss


@dataclass
class TrainConfig:
    seed: int = 1234
    steps: int = 300
    seq_len: int = 512
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    indexer_loss_coef: float = 0.01
    phases: PhaseConfig = field(default_factory=PhaseConfig)
    output_dir: str | None = None  # null: outputs/<timestamp>, chosen by global rank 0
    save_interval: int = 0  # 0: only at the end
    keep_checkpoints: int = 3  # keep the newest K published checkpoints (0: keep all)
    resume: Any = False  # false | true (the tag in `latest`) | auto (newest complete checkpoint) | a directory
    max_bad_steps: int = 5  # non-finite losses in a row (each skips its update) that stop the run with a checkpoint
    eval_interval: int = 0  # 0: only at the end
    eval_batches: int = 4


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "auto"  # auto: online if WANDB_API_KEY is set, else offline | online | offline | disabled
    project: str = "dsv4-train"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    interval: int = 10
    peak_tflops: Any = "auto"  # MFU's peak per rank: a number (TFLOP/s) | auto (by CUDA device name) | null (no MFU)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ParallelConfig:
    sequence_parallel_size: int = 1  # ranks that split each sequence (world = data parallel x this)


@dataclass
class RunConfig:
    model: ModelConfig
    attention: AttentionConfig
    deepspeed: DeepSpeedConfig
    data: DataConfig
    train: TrainConfig
    logging: LoggingConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def _typed(schema: type, node: Any, prefix: str):
    """Merge a config node into a dataclass schema; unknown keys and wrong types name the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node if node is not None else {})
        return OmegaConf.to_object(merged)
    except Exception as e:  # omegaconf errors carry full_key
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{prefix}.{key}: {msg}" if key else f"{prefix}: {msg}") from None


def apply_layout(model: dict[str, Any], attention: AttentionConfig) -> list[int]:
    """The per-layer compress_ratios a named attention layout produces for this model."""
    ratios = [int(r) for r in model.get("compress_ratios", [])]
    if attention.layout is None:
        return ratios
    n = int(model["num_hidden_layers"])
    hca = attention.hca_ratio or next((r for r in ratios if r > CSA_RATIO), 128)
    layout = attention.layout
    if layout == "window":
        return [WINDOW] * n
    if layout == "csa":
        return [CSA_RATIO] * n
    if layout == "hca":
        return [hca] * n
    if layout == "dense":
        return [DENSE] * n
    if layout == "v4_flash":  # two window-only layers, then CSA / HCA alternating from CSA
        return [WINDOW if i < 2 else (CSA_RATIO if i % 2 == 0 else hca) for i in range(n)]
    if layout == "v4_pro":  # two HCA layers, then CSA / HCA alternating from CSA
        return [hca if i < 2 else (CSA_RATIO if i % 2 == 0 else hca) for i in range(n)]
    raise ConfigError(f"attention.layout={layout!r}: choose null or one of {', '.join(LAYOUTS)}")


def resolve_config(cfg: DictConfig) -> RunConfig:
    """Validate the composed Hydra config and return typed, checked settings."""
    for group in ("model", "attention", "deepspeed", "data", "train", "logging"):
        if group not in cfg:
            raise ConfigError(f"{group}: missing config group (check conf/config.yaml's defaults)")
    extra = sorted(set(cfg.keys()) - {"model", "attention", "deepspeed", "data", "train", "logging", "parallel"})
    if extra:
        raise ConfigError(f"{extra[0]}: unknown top-level key")
    attention = _typed(AttentionConfig, cfg.attention, "attention")
    model_dict = OmegaConf.to_container(cfg.model, resolve=True)
    model_dict["compress_ratios"] = apply_layout(model_dict, attention)
    model = ModelConfig.from_dict(model_dict)
    run = RunConfig(
        model=model,
        attention=attention,
        deepspeed=_typed(DeepSpeedConfig, cfg.deepspeed, "deepspeed"),
        data=_typed(DataConfig, cfg.data, "data"),
        train=_typed(TrainConfig, cfg.train, "train"),
        logging=_typed(LoggingConfig, cfg.logging, "logging"),
        parallel=_typed(ParallelConfig, cfg.get("parallel"), "parallel"),
    )
    _check(run)
    return run


def _check(run: RunConfig) -> None:
    def need(cond: bool, key: str, value: Any, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}={value!r}: {msg}")

    a, d, t, lg = run.attention, run.deepspeed, run.train, run.logging
    need(run.parallel.sequence_parallel_size >= 1, "parallel.sequence_parallel_size",
         run.parallel.sequence_parallel_size, "must be >= 1")
    need(a.backend in ("auto", "triton", "torch", "naive"), "attention.backend", a.backend,
         "choose auto, triton, torch or naive")
    need(a.query_chunk_size >= 1, "attention.query_chunk_size", a.query_chunk_size, "must be >= 1")
    need(a.hca_ratio is None or a.hca_ratio > CSA_RATIO, "attention.hca_ratio", a.hca_ratio, "must be > 4")
    need(d.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", d.zero_stage, "choose 0, 1, 2 or 3")
    need(d.precision in ("auto", "bf16", "fp32"), "deepspeed.precision", d.precision,
         "choose auto, bf16 or fp32 (fp16 is not supported: V4's sink and compressor need bf16/fp32 range)")
    _check_data(run.data, need)
    for key in ("steps", "seq_len", "micro_batch_size", "grad_accum_steps", "eval_batches"):
        need(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "must be >= 1")
    need(t.lr > 0, "train.lr", t.lr, "must be > 0")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    need(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
    need(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    need(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", t.betas, "need two values in [0, 1)")
    need(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0 disables clipping)")
    need(t.indexer_loss_coef >= 0, "train.indexer_loss_coef", t.indexer_loss_coef, "must be >= 0")
    need(t.phases.dense_steps >= 0, "train.phases.dense_steps", t.phases.dense_steps, "must be >= 0")
    need(t.phases.indexer_warmup_steps >= 0, "train.phases.indexer_warmup_steps", t.phases.indexer_warmup_steps,
         "must be >= 0")
    need(t.save_interval >= 0, "train.save_interval", t.save_interval, "must be >= 0")
    need(t.eval_interval >= 0, "train.eval_interval", t.eval_interval, "must be >= 0")
    need(isinstance(t.resume, (bool, str)), "train.resume", t.resume, "use false, true or a directory")
    need(t.keep_checkpoints >= 0, "train.keep_checkpoints", t.keep_checkpoints, "must be >= 0 (0 keeps all)")
    need(t.max_bad_steps >= 1, "train.max_bad_steps", t.max_bad_steps, "must be >= 1")
    need(lg.interval >= 1, "logging.interval", lg.interval, "must be >= 1")
    need(lg.peak_tflops is None or lg.peak_tflops == "auto"
         or (isinstance(lg.peak_tflops, (int, float)) and not isinstance(lg.peak_tflops, bool) and lg.peak_tflops > 0),
         "logging.peak_tflops", lg.peak_tflops, "use a number of TFLOP/s per rank, auto or null")
    need(lg.wandb.mode in ("auto", "online", "offline", "disabled"), "logging.wandb.mode", lg.wandb.mode,
         "choose auto, online, offline or disabled")


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


def phase_for_step(train: TrainConfig, step: int) -> str:
    """The CSA attention phase at a (0-based) optimizer step: dense -> indexer_warmup -> sparse."""
    if step < train.phases.dense_steps:
        return "dense"
    if step < train.phases.dense_steps + train.phases.indexer_warmup_steps:
        return "indexer_warmup"
    return "sparse"


def run_config_dict(run: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(run)
