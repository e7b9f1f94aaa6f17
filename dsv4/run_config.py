"""Structured configs of a run (the schema of its config.yaml): every Hydra group is checked against a dataclass
here, so a bad or unknown value stops the run before training with an error that names the key.

The trainer resolves the composed config with it; loading, export and evaluation read a finished run's config.yaml
with the same schema (the CSA phase a step trained in, the run's data and sequence length), without importing the
trainer. Warnings said before training and checks of the machine live in dsv4.training.config."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from data_pipelines.config import (  # noqa: F401 (importable here with the run's other configs)
    DataConfig,
    PasskeyConfig,
    SourceConfig,
    check_data_config,
)
from data_pipelines.packed import DataError
from data_pipelines.schema import typed
from dsv4.config import CSA_RATIO, DENSE, WINDOW, ConfigError, ModelConfig, as_int, ratio_list

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
    # a run, checkpoint or export directory (ours or HF's DeepseekV4): a new run (step 0, fresh optimizer, LR schedule
    # and data) starts from its weights; ignored when train.resume finds a checkpoint to continue
    init_from: str | None = None
    max_bad_steps: int = 5  # non-finite losses in a row (each skips its update) that stop the run with a checkpoint
    # after warm-up, a training LM loss above this for max_bad_steps steps in a row stops the run as diverged:
    # auto (2 x ln(model.vocab_size), twice a uniform guess) | a number | null (never)
    diverge_loss: Any = "auto"
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
    return typed(schema, node, prefix, error=ConfigError)


def apply_layout(model: dict[str, Any], attention: AttentionConfig) -> list[int]:
    """The per-layer compress_ratios a named attention layout produces for this model."""
    ratios = ratio_list(model.get("compress_ratios", []), "model.compress_ratios")
    if attention.layout is None:
        return ratios
    n = as_int(model["num_hidden_layers"], "model.num_hidden_layers")
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
    _check_deepspeed_extra(d.extra, need)
    try:
        check_data_config(run.data)
    except DataError as e:
        raise ConfigError(str(e)) from None
    for key in ("steps", "seq_len", "micro_batch_size", "grad_accum_steps", "eval_batches"):
        need(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "must be >= 1")
    need(t.lr > 0, "train.lr", t.lr, "must be > 0")
    need(t.seed >= 0, "train.seed", t.seed, "must be >= 0 (NumPy and the data workers seed with it)")
    need(run.data.seed is None or run.data.seed >= 0, "data.seed", run.data.seed,
         "must be >= 0, or null to use train.seed")
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
    need(t.init_from is None or (isinstance(t.init_from, str) and t.init_from != ""), "train.init_from", t.init_from,
         "use null or a run, checkpoint or export directory")
    need(t.keep_checkpoints >= 0, "train.keep_checkpoints", t.keep_checkpoints, "must be >= 0 (0 keeps all)")
    need(t.max_bad_steps >= 1, "train.max_bad_steps", t.max_bad_steps, "must be >= 1")
    need(t.diverge_loss is None or t.diverge_loss == "auto"
         or (isinstance(t.diverge_loss, (int, float)) and not isinstance(t.diverge_loss, bool) and t.diverge_loss > 0),
         "train.diverge_loss", t.diverge_loss, "use a loss > 0, auto (2 x ln(model.vocab_size)) or null (never)")
    need(lg.interval >= 1, "logging.interval", lg.interval, "must be >= 1")
    need(lg.peak_tflops is None or lg.peak_tflops == "auto"
         or (isinstance(lg.peak_tflops, (int, float)) and not isinstance(lg.peak_tflops, bool) and lg.peak_tflops > 0),
         "logging.peak_tflops", lg.peak_tflops, "use a number of TFLOP/s per rank, auto or null")
    need(lg.wandb.mode in ("auto", "online", "offline", "disabled"), "logging.wandb.mode", lg.wandb.mode,
         "choose auto, online, offline or disabled")


# deepspeed.extra keys the trainer owns: set through these keys instead
OWNED_DEEPSPEED_KEYS = {"train_micro_batch_size_per_gpu": "train.micro_batch_size",
                        "gradient_accumulation_steps": "train.grad_accum_steps",
                        "train_batch_size": "train.micro_batch_size and train.grad_accum_steps",
                        "optimizer": "train.lr, train.betas, train.eps and train.weight_decay (AdamW)",
                        "scheduler": "train.warmup_steps and train.min_lr_ratio (warmup + cosine)"}


def _check_deepspeed_extra(extra: dict[str, Any], need) -> None:
    def deepspeed_reads() -> frozenset[str]:
        """The top-level keys DeepSpeed's config parser reads (it ignores any other without a word), found by
        parsing a minimal config whose dict records each key looked up."""
        from deepspeed.runtime.config import DeepSpeedConfig  # heavy: only when deepspeed.extra has keys

        seen: set[str] = set()

        class Keys(list):
            def __contains__(self, key) -> bool:
                seen.add(key)
                return list.__contains__(self, key)

        class Recorder(dict):
            def get(self, key, *default):
                seen.add(key)
                return super().get(key, *default)

            def __getitem__(self, key):
                seen.add(key)
                return super().__getitem__(key)

            def __contains__(self, key) -> bool:
                seen.add(key)
                return super().__contains__(key)

            def keys(self):
                return Keys(super().keys())

        DeepSpeedConfig(Recorder(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1))
        # read only with a process group (ZeRO.Init's sequence parallelism), which this parse has not
        return frozenset(k for k in seen if isinstance(k, str)) | {"sequence_parallel_size"}

    known = _check_deepspeed_extra.__dict__.get("known")
    if extra and known is None:  # once per process
        try:
            known = deepspeed_reads()
        except Exception:  # a DeepSpeed whose config parser this probe cannot run: unknown keys go unchecked
            known = frozenset()
        _check_deepspeed_extra.known = known
    for key in sorted(set(extra) - known, key=str) if known else ():
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        need(False, f"deepspeed.extra.{key}", extra[key], "not a key of DeepSpeed's config (DeepSpeed would ignore "
             f"it without a word){f'; did you mean {close[0]}?' if close else ''}")
    for key, instead in OWNED_DEEPSPEED_KEYS.items():
        need(key not in extra, f"deepspeed.extra.{key}", extra.get(key), f"the trainer sets it; use {instead}")
    fp16 = extra.get("fp16")
    need(not (isinstance(fp16, dict) and fp16.get("enabled")), "deepspeed.extra.fp16", fp16,
         "fp16 is not supported (V4's sink and compressor need bf16/fp32 range); use deepspeed.precision=bf16")
    zero = extra.get("zero_optimization")
    if isinstance(zero, dict) and "stage" in zero:
        need(zero["stage"] in (0, 1, 2, 3), "deepspeed.extra.zero_optimization.stage", zero["stage"],
             "choose 0, 1, 2 or 3 (or set deepspeed.zero_stage)")


def phase_for_step(train: TrainConfig, step: int) -> str:
    """The CSA attention phase at a (0-based) optimizer step: dense -> indexer_warmup -> sparse."""
    if step < train.phases.dense_steps:
        return "dense"
    if step < train.phases.dense_steps + train.phases.indexer_warmup_steps:
        return "indexer_warmup"
    return "sparse"


def run_config_dict(run: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(run)
