"""The training loop as steps: a `Trainer` sets a run up, then repeats one training step, evaluation and
checkpointing, and finishes with a summary.

    Trainer(cfg)          setup: every check, the run directory and its lock, the checkpoint to resume from, the
                          data, the engine. Mistakes stop here, before a step is trained, and change nothing.
      .train()            the loop: train_step() -> evaluate() when due -> log -> save() when due -> finish()
      .train_step(step)   one optimizer step over train.grad_accum_steps micro-batches; a non-finite loss or
                          gradient norm skips its update (a bad step)
      .evaluate()         validation loss over the held-out split
      .save(done)         a checkpoint, written, checksummed, then published (dsv4/training/checkpointing.py)
      .finish(stopped_by) final checkpoint, parameter digests, summary.json, the lock released

Where things live: interrupts in dsv4/training/signals.py (SIGINT/SIGTERM/SIGUSR1 stop at the next step boundary
with a checkpoint), the run directory and its lock in run_dir.py, the choice and verification of the checkpoint to
resume from (and forks) in resume.py, checksummed checkpoints in checkpointing.py. `train(cfg)` runs one."""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from data_pipelines import StreamingData, load_data_state, prepare_data, save_data_state
from dsv4.config import ConfigError
from dsv4.loading import initial_weights
from dsv4.model import DSV4Model
from dsv4.run_config import RunConfig, phase_for_step, resolve_config, run_config_dict
from dsv4.run_files import CHECKPOINTS, RUN_CONFIG
from dsv4.training import checkpointing, flops
from dsv4.training.config import check_environment, config_warnings
from dsv4.training.distributed import decided_by_rank0, init_distributed
from dsv4.training.health import CHECKSUM_MOD, all_finite, batch_checksum, gather_digests
from dsv4.training.metrics import (
    MetricsLogger,
    StepTimer,
    dumps_strict,
    eta_seconds,
    format_eta,
    peak_memory_bytes,
    trim_metrics,
)
from dsv4.training.optim import (
    FiniteStepAdamW,
    build_optimizer,
    deepspeed_config,
    describe_settings,
    effective_settings,
    lr_lambda,
    param_groups,
)
from dsv4.training.resume import ResumePoint, find_resume_point, shown
from dsv4.training.run_dir import RunLock, claim_run_dir, pick_run_dir
from dsv4.training.sequence_parallel import (
    check_sequence_parallel,
    lm_loss_for_backward,
    setup_sequence_parallel,
    shard_batch,
)
from dsv4.training.signals import StopRequest, exit_at_once_during_setup, write_pid_file
from dsv4.training.validation import empty_validation_warning, held_out_sizes

FIRST_BATCH_NOTICE_S = 10.0

__all__ = ["Trainer", "train", "evaluate", "doc_positions", "lr_lambda", "param_groups", "deepspeed_config",
           "format_summary"]


def doc_positions(batch: dict[str, torch.Tensor], run: RunConfig, device: torch.device) -> torch.Tensor | None:
    """Per-document positions when attention must stay inside documents (data.cross_document_attention=false)."""
    return None if run.data.cross_document_attention else batch["positions"].to(device)


def evaluate(engine, data, run: RunConfig, device: torch.device, sp=None) -> float | None:
    """Mean validation LM loss per token over the held-out split (every rank its share); None when the split holds
    no token (a NaN would read as a diverged model)."""
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in data.val_batches(run.train.eval_batches):
            batch = shard_batch(batch, sp)
            out = engine(batch["input_ids"].to(device), labels=batch["labels"].to(device),
                         positions=doc_positions(batch, run, device))
            totals += torch.stack((out.lm_loss_sum.double(), out.num_tokens.double()))
    engine.train()
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else None


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run training as configured; returns the summary (on every rank)."""
    return Trainer(cfg).train()


def _mean_across_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


@dataclass
class StepResult:
    """What one optimizer step did: the metrics record and why its update was skipped, if it was."""
    record: dict[str, float]
    bad: str | None  # None, "loss" (non-finite on some rank) or "grad_norm" (non-finite global gradient norm)
    stop_requested: bool  # a stop signal reached some rank (agreed by every rank)
    data_checksums: list[int] = field(default_factory=list)


class Trainer:
    """One training run. Construction does every check and builds everything; `train()` runs the loop."""

    # ---------------------------------------------------------------- setup

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.config = run = resolve_config(cfg)  # bad values stop here, before any process group or data
        check_environment(run, torch.cuda.is_available(), os.environ.get("TRITON_INTERPRET") == "1")
        self.data_plan = self._prepare_data()
        self.rank, self.world, _, self.device = init_distributed()
        self.is_main = self.rank == 0
        check_sequence_parallel(run.parallel.sequence_parallel_size, self.world, run.train.seq_len, run.model)
        self.ds_config = deepspeed_config(run, run.deepspeed.precision == "bf16" or (
            run.deepspeed.precision == "auto" and self.device.type == "cuda"))
        self.ds_settings = effective_settings(self.ds_config)  # after deepspeed.extra: what DeepSpeed will run
        self.lock: RunLock | None = None
        self.run_dir = decided_by_rank0(lambda: pick_run_dir(run))
        self.ckpt_dir = self.run_dir / CHECKPOINTS
        self._claim_run_dir()
        try:
            self._setup_after_claim()
        except BaseException:
            self._release()
            raise

    def say(self, message: str) -> None:
        """A line on the console, from global rank 0."""
        if self.is_main:
            print(message, flush=True)

    def _prepare_data(self):
        plan = prepare_data(self.config.data)  # missing files, unreadable shards, a bad tokenizer stop here
        if plan.vocab_size > self.config.model.vocab_size:
            raise ConfigError(f"model.vocab_size={self.config.model.vocab_size}: smaller than the tokenizer's "
                              f"vocabulary ({plan.vocab_size}); raise it")
        return plan

    def _claim_run_dir(self) -> None:
        """Rank 0 creates the run directory and takes its lock (refusing a live or reused one); from here on an
        interrupt during setup releases the lock and exits at once."""
        def claim() -> None:
            self.lock = claim_run_dir(self.config, self.run_dir, self.say)

        decided_by_rank0(claim)
        exit_at_once_during_setup(self.is_main, self._release)

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _setup_after_claim(self) -> None:
        run = self.config
        self.say(f"setting up: run dir {self.run_dir}")
        self.resume: ResumePoint | None = (find_resume_point(run, self.run_dir, self.world, self.say)
                                           if run.train.resume else None)
        self.start_step = self.resume.step if self.resume is not None else 0
        # train.init_from: read and checked before any data or engine; a resumed run has its own weights
        self.init_state = (initial_weights(run.train.init_from, run.model)
                           if run.train.init_from and self.resume is None else None)
        self.nothing_to_do = self.resume is not None and self.resume.step >= run.train.steps
        if self.nothing_to_do:
            return
        # sequence parallelism: SP groups of consecutive ranks share a data-parallel rank and split each sequence
        self.layout = setup_sequence_parallel(run.parallel.sequence_parallel_size, self.rank, self.world,
                                              run.train.seq_len)
        self.data = self._streaming_data()  # with the checkpoint's stream position: a mismatch stops here
        self.validation_warning = self._check_validation()
        if self.is_main:
            (self.run_dir / RUN_CONFIG).write_text(OmegaConf.to_yaml(self.cfg))
            (self.run_dir / "deepspeed.json").write_text(dumps_strict(self.ds_config, indent=2))
        self.logger = MetricsLogger(run.logging.wandb, self.run_dir, self.is_main,
                                    {**run_config_dict(run), "deepspeed_effective": self.ds_settings})
        self.say("building the model and the DeepSpeed engine")
        self._build_engine()
        if self.resume is not None:
            self._load_checkpoint()
        self._plan_throughput()
        self._print_banner()
        self.stop = StopRequest(announce=self.is_main, cleanup=self._release)
        self.history: list[dict[str, float]] = []
        self.bad_in_a_row = self.bad_total = 0
        self.high_in_a_row = 0  # steps after warm-up with the LM loss above diverge_threshold(), in a row
        self.last_applied: int | None = None  # the last step whose update was applied, in this run
        self.last_saved = self.start_step if self.resume is not None else -1
        self.val_loss: float | None = None
        self.val_step: int | None = None
        self.first_batch = True  # the first micro-batch may take long: _next_batch says why

    def _streaming_data(self):
        t, point = self.config.train, self.resume
        seed = t.seed + point.step if point is not None and point.universal else t.seed
        # the ranks of one SP group read the same samples
        data = StreamingData(self.data_plan, t.seq_len, t.micro_batch_size, seed, self.layout.dp_rank,
                             self.layout.dp_world)
        if point is not None and point.universal:  # per-rank stream positions cannot follow a new rank layout
            self.say("warning: the data stream restarts (reseeded) after a rank-count change; resumed samples are "
                     "not the ones the original run would have read")
        elif point is not None:
            load_data_state(data, point.path, self.rank)  # this rank's stream position at that checkpoint
        return data

    def _check_validation(self) -> str | None:
        """Collective: build the held-out set now (evaluation reuses it) and warn, before training, when it packs
        into no sequence: the final evaluation would measure nothing. The run still trains and checkpoints (a tiny
        corpus is a fine smoke test), with val_loss null -> the warning, or None."""
        local = sum(len(b["input_ids"]) for b in self.data.val_batches(self.config.train.eval_batches))
        total = torch.tensor([float(local)], device=self.device)
        dist.all_reduce(total)
        if total.item() > 0:
            return None
        warning = None
        if self.is_main:
            warning = empty_validation_warning(self.data_plan, held_out_sizes(self.data_plan, self.data.seed),
                                               self.config.train.seq_len)
            self.say(warning)
        return warning or "warning: no validation data"

    def _build_engine(self) -> None:
        import deepspeed

        run = self.config
        torch.manual_seed(run.train.seed)
        model = DSV4Model(run.model, backend=run.attention.backend, chunk_size=run.attention.query_chunk_size,
                          phase=phase_for_step(run.train, 0), deterministic=run.attention.deterministic)
        if self.init_state is not None:  # before DeepSpeed shards anything: every rank holds the whole model here
            model.load_state_dict(self.init_state, strict=True)
            self.init_state = None
            self.say(f"initialised from train.init_from={run.train.init_from} (step 0, fresh optimizer, LR and data)")
        model.set_sequence_parallel(self.layout.sp)
        self.n_params = sum(p.numel() for p in model.parameters())
        optimizer = build_optimizer(model, run, self.ds_settings)
        ds_config = dict(self.ds_config)
        if isinstance(optimizer, FiniteStepAdamW):
            ds_config["gradient_clipping"] = 0.0  # it clips by the norm it checks
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(run.train, s))
        if self.resume is not None and self.resume.universal:
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            **({"mpu": self.layout.mpu} if self.layout.mpu is not None else {}))

    def _load_checkpoint(self) -> None:
        point = self.resume
        self.say(f"loading {point.load_dir / point.load_tag}")
        load_path, client = self.engine.load_checkpoint(str(point.load_dir), tag=point.load_tag)
        if load_path is None:
            raise ConfigError(f"train.resume={shown(self.config.train.resume)}: DeepSpeed could not load "
                              f"{point.load_dir / point.load_tag}")
        self.start_step = int(client["step"])
        self.say(f"resumed from {load_path} at step {self.start_step}")
        if point.universal:  # the conversion must keep every parameter: show the digests to compare
            self.say(f"parameters after loading (sha256 per rank): {gather_digests(self.engine.module)}")

    def _plan_throughput(self) -> None:
        run, t = self.config, self.config.train
        sequences_per_step = t.micro_batch_size * t.grad_accum_steps * self.layout.dp_world
        self.tokens_per_step = sequences_per_step * t.seq_len
        n_matmul = flops.matmul_params(self.engine.module)
        self.peak_flops, self.peak_source = flops.peak_flops_per_rank(run.logging.peak_tflops, self.device)
        self.flops_per_step = {
            p: sequences_per_step * flops.training_flops_per_sequence(run.model, t.seq_len, p, n_matmul)
            for p in ("dense", "indexer_warmup", "sparse")}

    def _print_banner(self) -> None:
        run = self.config
        kinds = [run.model.layer_kind(i) for i in range(run.model.num_hidden_layers)]
        self.say(
            f"dsv4-train | {self.n_params / 1e6:.2f}M params | layers {kinds} | ranks {self.world} on "
            f"{self.device.type} (data parallel {self.layout.dp_world} x sequence parallel {self.layout.sp_size}) | "
            f"{describe_settings(self.ds_settings, run)} | {self.tokens_per_step} tokens/step | "
            f"data {self.data_plan.describe()} | run dir {self.run_dir}")
        self.say(f"MFU: {self.peak_source}")
        for warning in config_warnings(run):
            self.say(warning)

    # ---------------------------------------------------------------- the loop

    def train(self) -> dict[str, Any]:
        """Train from the start (or resumed) step to train.steps; returns the summary on every rank."""
        if self.nothing_to_do:
            return self._nothing_to_do()
        try:
            return self._loop()
        except BaseException:
            self.logger.finish()  # W&B keeps what was logged
            raise
        finally:
            self._release()

    def _nothing_to_do(self) -> dict[str, Any]:
        t = self.config.train
        self.say(f"train.resume: {self.resume.path} is at step {self.resume.step} and train.steps={t.steps}: nothing "
                 "to train (raise train.steps to continue); the run directory was left as it is")
        self._release()
        return {"steps": self.resume.step, "steps_this_run": 0, "nothing_to_do": True}

    def _loop(self) -> dict[str, Any]:
        run = self.config
        self.stop.install()
        write_pid_file(self.run_dir, self.rank)
        stopped_by: str | None = None
        self.t_start = time.perf_counter()
        self.phase: str | None = None
        self._trim_metrics()
        self.batches = self.data.batches()
        for step in range(self.start_step, run.train.steps):
            result = self.train_step(step)
            done = step + 1
            stopped_by = self._count_bad_step(result.bad) or self._count_high_loss(step, result.record["lm_loss"])
            if result.stop_requested and stopped_by is None:
                stopped_by = "signal"
            evaluated = stopped_by is None and self.validation_warning is None and self._evaluation_due(done)
            if evaluated:
                self.val_loss, self.val_step = self.evaluate(), done
            self._log_step(done, result, evaluated)
            self._explain_stop(done, result, stopped_by)
            if stopped_by is not None:
                self.save(done)
                break
            if run.train.save_interval and done % run.train.save_interval == 0 and done < run.train.steps:
                self.save(done)
        return self.finish(stopped_by)

    def _trim_metrics(self) -> None:
        """metrics.jsonl: one line per step after any resume. Lines an interrupted run logged past the step this
        run starts from (its checkpoint's, or 0) are dropped: those steps are trained, and logged, again."""
        if not self.is_main:
            return
        kept, dropped = trim_metrics(self.run_dir / "metrics.jsonl", self.start_step)
        if dropped:
            self.say(f"metrics.jsonl: kept steps 1-{self.start_step} ({kept} lines) and dropped {dropped} line(s) "
                     f"an interrupted run logged after step {self.start_step} (trained again now)"
                     if self.start_step else
                     f"metrics.jsonl: dropped {dropped} line(s) of an interrupted run that left no checkpoint "
                     "(starting over from step 0)")

    def _next_batch(self) -> dict[str, torch.Tensor]:
        """The next micro-batch. The first can take long (workers start, then fill data.shuffle_buffer packed
        sequences, re-reading a small corpus once per pass over it): after FIRST_BATCH_NOTICE_S, say so."""
        if not self.first_batch:
            return next(self.batches)
        self.first_batch = False
        data = self.config.data
        notice = threading.Timer(FIRST_BATCH_NOTICE_S, self.say, [
            f"waiting for the first batch ({FIRST_BATCH_NOTICE_S:.0f} s so far): the data worker(s) "
            f"(data.num_workers={data.num_workers}) start, then fill a pool of data.shuffle_buffer="
            f"{data.shuffle_buffer} packed sequences of {self.config.train.seq_len + 1} tokens before the first "
            "batch; a small corpus is read again for every pass over it, which makes this slow (lower "
            "data.shuffle_buffer to start sooner)"])
        notice.daemon = True
        notice.start()
        try:
            return next(self.batches)
        finally:
            notice.cancel()

    def _set_phase(self, step: int) -> None:
        new_phase = phase_for_step(self.config.train, step)
        if new_phase != self.phase:
            self.engine.module.set_attention_options(phase=new_phase)
            if self.phase is not None or step > 0:
                self.say(f"step {step}: CSA attention phase -> {new_phase}")
            self.phase = new_phase

    def train_step(self, step: int) -> StepResult:
        """One optimizer step over train.grad_accum_steps micro-batches. A non-finite loss on any rank skips the
        step's update (every rank agrees; its data is still consumed, so the data order stays); so does a
        non-finite global gradient norm (DeepSpeed's optimizers skip such a step, FiniteStepAdamW on ZeRO-0)."""
        run, engine, device, sp = self.config, self.engine, self.device, self.layout.sp
        self._set_phase(step)
        t0 = time.perf_counter()
        lm_sum = idx_sum = data_wait = 0.0
        timer = StepTimer(device)
        bad: str | None = None
        checksum = 0
        # rank 0 records sink mass and indexer recall on logging steps (first micro-batch; no collectives involved)
        engine.module.options.collect_stats = self.is_main and (step + 1) % run.logging.interval == 0
        for _ in range(run.train.grad_accum_steps):
            t_wait = time.perf_counter()
            batch = self._next_batch()  # input_ids, labels, doc_ids, positions: [B, S]
            data_wait += time.perf_counter() - t_wait
            checksum = (checksum + batch_checksum(batch["input_ids"])) % CHECKSUM_MOD
            if bad:  # the rest of a skipped step: its data is consumed (the order stays), nothing computed
                continue
            batch = shard_batch(batch, sp)  # this rank's part of each sequence (all of it without SP)
            with timer("forward"):
                out = engine(batch["input_ids"].to(device), labels=batch["labels"].to(device),
                             positions=doc_positions(batch, run, device))
                engine.module.options.collect_stats = False
                lm_loss = lm_loss_for_backward(out, sp)  # local sum / the sequence's token count under SP
                loss = lm_loss
                if out.indexer_loss is not None:
                    loss = loss + run.train.indexer_loss_coef * out.indexer_loss
            if not all_finite(loss, device):  # every rank agrees, so every rank skips the same update
                bad = "loss"
                continue
            if out.indexer_loss is not None:
                idx_sum += out.indexer_loss.item() * self.layout.sp_size  # SP ranks hold parts of one loss
            with timer("backward"):
                engine.backward(loss)
            with timer("optimizer"):
                engine.step()
            lm_sum += lm_loss.item() * self.layout.sp_size  # the mean over all ranks below sums the SP parts
        step_time = time.perf_counter() - t0
        grad_norm = engine.get_global_grad_norm()  # DeepSpeed's global norm, taken before clipping
        grad_norm = float(grad_norm) if grad_norm is not None and not bad else float("nan")
        if bad is None and (not engine.was_step_applied() or not math.isfinite(grad_norm)):
            bad = "grad_norm"  # the same on every rank: the norm is global
        accum = run.train.grad_accum_steps
        lm_loss, idx_loss = _mean_across_ranks([lm_sum / accum, idx_sum / accum], device)
        if bad == "loss":
            lm_loss = idx_loss = float("nan")
        checksums, stop_requested = self._agree_checksums_and_stop(checksum)
        if bad is None:
            self.last_applied = step + 1
        record = self._step_record(step_time, data_wait, timer, lm_loss, idx_loss, grad_norm, bad is not None)
        return StepResult(record, bad, stop_requested, checksums)

    def _agree_checksums_and_stop(self, checksum: int) -> tuple[list[int], bool]:
        """One collective per step: every rank's data checksum (its slot) and the stop flag (last slot)."""
        flags = torch.zeros(self.world + 1, dtype=torch.float64, device=self.device)
        flags[self.rank] = checksum
        flags[self.world] = 1.0 if self.stop.requested else 0.0
        dist.all_reduce(flags)
        return [int(c) for c in flags[:self.world].tolist()], flags[self.world].item() > 0

    def _step_record(self, step_time: float, data_wait: float, timer: StepTimer, lm_loss: float, idx_loss: float,
                     grad_norm: float, bad: bool) -> dict[str, float]:
        run = self.config
        lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else run.train.lr
        step_flops = self.flops_per_step[self.phase]
        record = {"loss": lm_loss + run.train.indexer_loss_coef * idx_loss, "lm_loss": lm_loss,
                  "indexer_loss": idx_loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": self.tokens_per_step / step_time, "step_time_s": step_time,
                  "data_wait_s": data_wait, "forward_s": timer.totals.get("forward", 0.0),
                  "backward_s": timer.totals.get("backward", 0.0), "optimizer_s": timer.totals.get("optimizer", 0.0),
                  "tflops_per_rank": step_flops / step_time / self.world / 1e12,
                  "peak_mem_gb": peak_memory_bytes(self.device) / 2**30, "bad_steps": float(self.bad_total + bad)}
        if self.peak_flops is not None:
            record["mfu"] = step_flops / step_time / (self.peak_flops * self.world)
        record.update(self.engine.module.attention_stats())  # sink_mass, indexer_recall (logging steps, rank 0)
        if len(self.data_plan.sources) > 1:  # realised mixture (this rank's documents so far)
            stats = self.data.stats()
            total_docs = sum(stats["docs"].values()) or 1
            record.update({f"mix_docs/{name}": n / total_docs for name, n in stats["docs"].items()})
        return record

    def _log_step(self, done: int, result: StepResult, evaluated: bool) -> None:
        """metrics.jsonl (strict JSON, with val_loss / val_ppl on evaluation steps), W&B and, every
        logging.interval steps, the console line."""
        run, record = self.config, result.record
        self.history.append(record)
        extra = {"val_loss": self.val_loss, "val_ppl": _ppl(self.val_loss)} if evaluated else {}
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(dumps_strict({"step": done, "phase": self.phase, **record, **extra,
                                      "data_checksum": result.data_checksums}) + "\n")
        self.logger.log(done, {f"train/{k}": v for k, v in record.items()}
                        | ({"val/loss": extra["val_loss"], "val/ppl": extra["val_ppl"]} if evaluated else {}))
        if done % run.logging.interval == 0 or done == run.train.steps or done == self.start_step + 1:
            eta = format_eta(eta_seconds([h["step_time_s"] for h in self.history], run.train.steps - done))
            mfu = f" | mfu {record['mfu']:.1%}" if "mfu" in record else ""
            self.say(f"step {done:>6}/{run.train.steps} | loss {record['loss']:.4f} | lm {record['lm_loss']:.4f} | "
                     f"idx {record['indexer_loss']:.4f} | lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f} | "
                     f"tok/s {record['tokens_per_s']:,.0f} | wait {record['data_wait_s'] * 1000:.0f}ms{mfu} | "
                     f"{self.phase} | eta {eta}")
        if evaluated:
            self.say(f"step {done:>6} | val loss {_number(self.val_loss, '.4f')} | ppl "
                     f"{_number(_ppl(self.val_loss), '.1f')}")

    def _evaluation_due(self, done: int) -> bool:
        interval = self.config.train.eval_interval
        return done == self.config.train.steps or bool(interval and done % interval == 0)

    # ---------------------------------------------------------------- bad steps and stopping

    def _count_bad_step(self, bad: str | None) -> str | None:
        """Count a skipped update; the reason to stop (`bad_step`, `bad_steps`) or None."""
        t = self.config.train
        if bad is None:
            self.bad_in_a_row = 0
            return None
        self.bad_total += 1
        self.bad_in_a_row += 1
        if bad == "loss" and t.grad_accum_steps > 1:
            return "bad_step"  # earlier micro-batches already accumulated gradients inside DeepSpeed
        if self.bad_in_a_row >= t.max_bad_steps:
            return "bad_steps"
        return None

    def _count_high_loss(self, step: int, lm_loss: float) -> str | None:
        """After warm-up, count steps whose training LM loss (the mean over ranks: every rank agrees) is above
        train.diverge_loss; `diverged` when train.max_bad_steps come in a row, else None."""
        limit = diverge_threshold(self.config)
        if limit is None or step < self.config.train.warmup_steps or not math.isfinite(lm_loss):
            return None  # a non-finite loss is a bad step, counted by _count_bad_step
        self.high_in_a_row = self.high_in_a_row + 1 if lm_loss > limit else 0
        return "diverged" if self.high_in_a_row >= self.config.train.max_bad_steps else None

    def _explain_stop(self, done: int, result: StepResult, stopped_by: str | None) -> None:
        t = self.config.train
        if result.bad is not None:
            what = ("non-finite loss on at least one rank" if result.bad == "loss" else
                    f"non-finite gradient norm ({result.record['grad_norm']})")
            self.say(f"step {done}: {what}; update skipped ({self.bad_in_a_row} in a row, {self.bad_total} in this "
                     f"run; train.max_bad_steps={t.max_bad_steps})")
        if stopped_by == "bad_step":
            # gradients are not saved: stop with a checkpoint of the last applied update, so a resume skips this step
            self.say(f"stopping: with train.grad_accum_steps={t.grad_accum_steps} a skipped update needs a restart; "
                     f"{self._last_update_truth(done)}; resume with train.resume=auto")
        elif stopped_by == "bad_steps":
            self.say(f"stopping: {self.bad_in_a_row} skipped updates in a row (non-finite loss or gradient norm; "
                     f"train.max_bad_steps={t.max_bad_steps}); {self._last_update_truth(done)}. Lower train.lr or "
                     "check the data around this step before resuming")
        elif stopped_by == "diverged":
            self.say(f"stopping: training diverged: LM loss {result.record['lm_loss']:.4g} above "
                     f"train.diverge_loss={diverge_threshold(self.config):.4g} for {self.high_in_a_row} steps in a row "
                     f"(train.max_bad_steps={t.max_bad_steps}) with train.lr={t.lr:g}; lower train.lr (or set "
                     f"train.diverge_loss=null to train on); checkpoint at step {done}, older ones kept")
        elif stopped_by == "signal":
            self.say(f"step {done}: stop signal received ({self.stop.signal_name or 'on another rank'}); "
                     "checkpointing and exiting")

    def _last_update_truth(self, done: int) -> str:
        """What the checkpoint about to be written holds, said as it is."""
        if self.last_applied is None:
            return (f"no update of this run was applied (it started at step {self.start_step}): the checkpoint at "
                    f"step {done} holds the weights it started from, which may be broken")
        return (f"the last applied update was step {self.last_applied}; the checkpoint at step {done} holds the model "
                "as of then (skipped steps change no weight) and prunes no older checkpoint")

    # ---------------------------------------------------------------- evaluation and checkpoints

    def evaluate(self) -> float:
        """Mean validation LM loss per token (collective)."""
        return evaluate(self.engine, self.data, self.config, self.device, self.layout.sp)

    def save(self, done: int) -> None:
        """Collective: write, checksum, then publish the checkpoint after `done` steps; every rank writes its data
        state. Older checkpoints are pruned only after a step with an applied update, and the one this run
        resumed from never."""
        healthy = self.bad_in_a_row == 0 and self.high_in_a_row == 0 and self.last_applied is not None
        own = self.resume is not None and self.resume.ckpt_dir.resolve() == self.ckpt_dir.resolve()
        protect = [self.resume.tag] if own else []
        report = checkpointing.save_checkpoint(
            self.engine, self.ckpt_dir, done, self.rank, self.world, self.config.train.keep_checkpoints,
            save_rank_state=lambda staging: save_data_state(self.data, staging, self.rank),
            client_state={"step": done}, model_config=self.config.model.to_dict(), allow_prune=healthy,
            protect=protect)
        self.last_saved = done
        self.say(f"checkpoint {report.path} ({report.bytes / 2**20:,.1f} MiB: written in {report.write_s:.2f} s, "
                 f"checksummed in {report.checksum_s:.2f} s)")

    # ---------------------------------------------------------------- finishing

    def finish(self, stopped_by: str | None) -> dict[str, Any]:
        """Final checkpoint (unless stopped), parameter digests, summary.json; every rank."""
        run = self.config
        wall = time.perf_counter() - self.t_start
        self.data.close()
        if self.history and stopped_by is None and self.last_saved != run.train.steps:
            self.save(run.train.steps)
        self.say(f"data (rank {self.rank}): {self.data.describe_stats()}")
        digests = gather_digests(self.engine.module)  # every rank's parameters: equal when the ranks stayed in sync
        if len(set(digests)) > 1:
            self.say(f"warning: parameters differ across ranks at the end: {digests}")
        summary = _summary(self.history, self.val_loss, wall, self.tokens_per_step, self.run_dir, self.start_step)
        summary.update(stopped_by=stopped_by, bad_steps=self.bad_total, param_digests=digests, val_step=self.val_step)
        self.logger.summary(summary)
        if self.is_main:
            (self.run_dir / "summary.json").write_text(dumps_strict(summary, indent=2))
            if self.validation_warning is not None:
                self.say(self.validation_warning)
            self.say(format_summary(summary))
        self.logger.finish()
        return summary


def diverge_threshold(run: RunConfig) -> float | None:
    """The training LM loss above which a step counts toward divergence (train.diverge_loss; auto: twice the loss
    of a uniform guess over the vocabulary), or None (never)."""
    limit = run.train.diverge_loss
    if limit is None:
        return None
    return 2 * math.log(run.model.vocab_size) if limit == "auto" else float(limit)


def _ppl(loss: float | None) -> float | None:
    return math.exp(min(loss, 50)) if loss is not None and math.isfinite(loss) else None


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _summary(history, val_loss, wall, tokens_per_step, run_dir, start_step) -> dict[str, Any]:
    k = max(1, min(10, len(history) // 4)) if history else 1
    steady = [h["tokens_per_s"] for h in history[1:]] or [h["tokens_per_s"] for h in history]
    return {
        "steps": start_step + len(history),
        "steps_this_run": len(history),
        "start_step": start_step,
        "tokens_this_run": len(history) * tokens_per_step,
        "lm_loss_start": _mean([h["lm_loss"] for h in history[:k]]),
        "lm_loss_end": _mean([h["lm_loss"] for h in history[-k:]]),
        "loss_window": k,
        "val_loss": val_loss,
        "val_ppl": _ppl(val_loss),
        "tokens_per_s": _mean(steady),
        "wall_time_s": wall,
        "run_dir": str(run_dir),
    }


def _number(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None and math.isfinite(value) else "n/a"


def format_summary(s: dict[str, Any]) -> str:
    stopped = f" (stopped: {s['stopped_by']})" if s.get("stopped_by") else ""
    val = f" at step {s['val_step']}" if s.get("val_step") not in (None, s["steps"]) else ""
    return (
        "==== summary ====\n"
        f"steps {s['start_step']}->{s['steps']}{stopped} | {s['tokens_this_run']:,} tokens | "
        f"{s['wall_time_s']:.1f} s | {_number(s['tokens_per_s'], ',.0f')} tokens/s\n"
        f"train LM loss {_number(s['lm_loss_start'], '.4f')} -> {_number(s['lm_loss_end'], '.4f')} (mean of the "
        f"first / last {s['loss_window']} steps)\n"
        f"validation loss {_number(s['val_loss'], '.4f')} | perplexity {_number(s['val_ppl'], '.1f')}{val}\n"
        f"run dir {s['run_dir']} (checkpoints/, config.yaml, metrics.jsonl, summary.json)"
    )
