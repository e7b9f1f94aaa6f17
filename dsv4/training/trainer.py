"""The training loop as steps: a `Trainer` sets a run up, then repeats one training step, evaluation and
checkpointing, and finishes with a summary.

    Trainer(cfg)          setup: config, data, process group, run directory, resume, engine (mistakes stop here)
      .train()            the loop: train_step() -> log -> evaluate() / save() when due -> finish()
      .train_step(step)   one optimizer step over train.grad_accum_steps micro-batches
      .evaluate()         validation loss over the held-out split
      .save(done)         a checkpoint, written then published (dsv4/training/checkpointing.py)
      .finish(stopped_by) final checkpoint and evaluation, parameter digests, summary.json

`train(cfg)` runs one. DeepSpeed engine, AdamW, warmup + cosine LR, clipping, accumulation, CSA phases, the indexer
loss, checkpoints and resume; metrics from global rank 0."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from dsv4.config import ConfigError
from dsv4.model import DSV4Model
from dsv4.training import checkpointing, flops
from dsv4.training.config import RunConfig, phase_for_step, resolve_config, run_config_dict
from dsv4.training.distributed import init_distributed
from dsv4.training.health import CHECKSUM_MOD, all_finite, batch_checksum, gather_digests
from dsv4.training.metrics import MetricsLogger, StepTimer, format_eta, peak_memory_bytes
from dsv4.training.optim import deepspeed_config, lr_lambda, param_groups
from dsv4.training.resume import UNIVERSAL_SUFFIX, resume_tag
from dsv4.training.run_dir import choose_run_dir
from dsv4.training.sequence_parallel import (
    check_sequence_parallel,
    lm_loss_for_backward,
    setup_sequence_parallel,
    shard_batch,
)
from dsv4.training.signals import StopRequest, write_pid_file

__all__ = ["Trainer", "train", "evaluate", "doc_positions", "lr_lambda", "param_groups", "deepspeed_config",
           "format_summary"]


def doc_positions(batch: dict[str, torch.Tensor], run: RunConfig, device: torch.device) -> torch.Tensor | None:
    """Per-document positions when attention must stay inside documents (data.cross_document_attention=false)."""
    return None if run.data.cross_document_attention else batch["positions"].to(device)


def evaluate(engine, data, run: RunConfig, device: torch.device, sp=None) -> float:
    """Mean validation LM loss per token over the held-out split (every rank its share)."""
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
    return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run training as configured; returns the summary (on every rank)."""
    return Trainer(cfg).train()


def _mean_across_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


@dataclass
class StepResult:
    """What one optimizer step did: the metrics record and whether its update was skipped."""
    record: dict[str, float]
    bad: bool
    stop_requested: bool  # a stop signal reached some rank (agreed by every rank)
    data_checksums: list[int] = field(default_factory=list)


class Trainer:
    """One training run. Construction does every check and builds everything; `train()` runs the loop."""

    # ---------------------------------------------------------------- setup

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.config = run = resolve_config(cfg)  # bad values stop here, before any process group or data
        self.data_plan = self._prepare_data()
        self.rank, self.world, _, self.device = init_distributed()
        self.is_main = self.rank == 0
        self.use_bf16 = run.deepspeed.precision == "bf16" or (run.deepspeed.precision == "auto"
                                                              and self.device.type == "cuda")
        self.run_dir = choose_run_dir(run, self.rank)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        self.logger = MetricsLogger(run.logging.wandb, self.run_dir, self.is_main, run_config_dict(run))
        # sequence parallelism: SP groups of consecutive ranks share a data-parallel rank and split each sequence
        check_sequence_parallel(run.parallel.sequence_parallel_size, self.world, run.train.seq_len, run.model)
        self.layout = setup_sequence_parallel(run.parallel.sequence_parallel_size, self.rank, self.world,
                                              run.train.seq_len)
        self._build_engine()
        self.data = self._streaming_data(run.train.seed)
        self.start_step = 0
        self.last_saved = -1
        if self.resume_from is not None:
            self._load_checkpoint()
        self._plan_throughput()
        self._print_banner()
        self.stop = StopRequest()
        self.history: list[dict[str, float]] = []
        self.bad_in_a_row = self.bad_total = 0
        self.val_loss = float("nan")

    def _prepare_data(self):
        from data_pipelines import prepare_data

        plan = prepare_data(self.config.data)  # missing files, unreadable shards, a bad tokenizer stop here
        if plan.vocab_size > self.config.model.vocab_size:
            raise ConfigError(f"model.vocab_size={self.config.model.vocab_size}: smaller than the tokenizer's "
                              f"vocabulary ({plan.vocab_size}); raise it")
        return plan

    def _build_engine(self) -> None:
        import deepspeed

        run = self.config
        torch.manual_seed(run.train.seed)
        model = DSV4Model(run.model, backend=run.attention.backend, chunk_size=run.attention.query_chunk_size,
                          phase=phase_for_step(run.train, 0), deterministic=run.attention.deterministic)
        model.set_sequence_parallel(self.layout.sp)
        self.n_params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(param_groups(model, run.train.weight_decay), lr=run.train.lr,
                                      betas=tuple(run.train.betas), eps=run.train.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(run.train, s))
        # the checkpoint to resume from is chosen first: another rank count needs the universal loader configured
        self.resume_from, self.universal = (resume_tag(run, self.ckpt_dir, self.world, self.logger.print)
                                            if run.train.resume else (None, False))
        ds_config = deepspeed_config(run, self.use_bf16)
        if self.universal:
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            **({"mpu": self.layout.mpu} if self.layout.mpu is not None else {}))

    def _streaming_data(self, seed: int):
        from data_pipelines import StreamingData

        t = self.config.train
        # the ranks of one SP group read the same samples
        return StreamingData(self.data_plan, t.seq_len, t.micro_batch_size, seed, self.layout.dp_rank,
                             self.layout.dp_world)

    def _load_checkpoint(self) -> None:
        from data_pipelines import load_data_state

        tag = self.resume_from
        load_tag = tag + UNIVERSAL_SUFFIX if self.universal else tag
        load_path, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=load_tag)
        if load_path is None:
            raise ConfigError(f"train.resume={self.config.train.resume!r}: DeepSpeed could not load "
                              f"{self.ckpt_dir / load_tag}")
        self.start_step = int(client["step"])
        if self.universal:  # per-rank stream positions cannot follow a new rank layout: the stream restarts, reseeded
            self.data = self._streaming_data(self.config.train.seed + self.start_step)
            self.logger.print("warning: the data stream restarts (reseeded) after a rank-count change; resumed "
                              "samples are not the ones the original run would have read")
        else:
            load_data_state(self.data, self.ckpt_dir / tag, self.rank)  # this rank's stream position then
        self.logger.print(f"resumed from {load_path} at step {self.start_step}")
        self.last_saved = self.start_step

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
        self.logger.print(
            f"dsv4-train | {self.n_params / 1e6:.2f}M params | layers {kinds} | ranks {self.world} on "
            f"{self.device.type} (data parallel {self.layout.dp_world} x sequence parallel {self.layout.sp_size}) | "
            f"ZeRO-{run.deepspeed.zero_stage} {'bf16' if self.use_bf16 else 'fp32'} | {self.tokens_per_step} "
            f"tokens/step | data {self.data_plan.describe()} | run dir {self.run_dir}")
        self.logger.print(f"MFU: {self.peak_source}")

    # ---------------------------------------------------------------- the loop

    def train(self) -> dict[str, Any]:
        """Train from the start (or resumed) step to train.steps; returns the summary on every rank."""
        run = self.config
        self.stop.install()
        write_pid_file(self.run_dir, self.rank)
        stopped_by: str | None = None
        self.t_start = time.perf_counter()
        self.phase: str | None = None
        self.batches = self.data.batches()
        for step in range(self.start_step, run.train.steps):
            result = self.train_step(step)
            done = step + 1
            self._log_step(done, result)
            stopped_by = self._bad_step_verdict(done, result.bad)
            if result.stop_requested and stopped_by is None:
                stopped_by = "signal"
                self.logger.print(f"step {done}: stop signal received ({self.stop.signal_name or 'on another rank'}"
                                  "); checkpointing and exiting")
            if stopped_by is not None:
                self.save(done)
                break
            if run.train.eval_interval and done % run.train.eval_interval == 0 and done < run.train.steps:
                self._log_validation(done, self.evaluate())
            if run.train.save_interval and done % run.train.save_interval == 0 and done < run.train.steps:
                self.save(done)
        return self.finish(stopped_by)

    def _set_phase(self, step: int) -> None:
        new_phase = phase_for_step(self.config.train, step)
        if new_phase != self.phase:
            self.engine.module.set_attention_options(phase=new_phase)
            if self.phase is not None or step > 0:
                self.logger.print(f"step {step}: CSA attention phase -> {new_phase}")
            self.phase = new_phase

    def train_step(self, step: int) -> StepResult:
        """One optimizer step over train.grad_accum_steps micro-batches. A non-finite loss on any rank skips the
        step's update (every rank agrees); its data is still consumed, so the data order stays."""
        run, engine, device, sp = self.config, self.engine, self.device, self.layout.sp
        self._set_phase(step)
        t0 = time.perf_counter()
        lm_sum = idx_sum = data_wait = 0.0
        timer = StepTimer(device)
        bad = False
        checksum = 0
        # rank 0 records sink mass and indexer recall on logging steps (first micro-batch; no collectives involved)
        engine.module.options.collect_stats = self.is_main and (step + 1) % run.logging.interval == 0
        for _ in range(run.train.grad_accum_steps):
            t_wait = time.perf_counter()
            batch = next(self.batches)  # input_ids, labels, doc_ids, positions: [B, S]
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
                bad = True
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
        accum = run.train.grad_accum_steps
        lm_loss, idx_loss = _mean_across_ranks([lm_sum / accum, idx_sum / accum], device)
        if bad:
            lm_loss = idx_loss = float("nan")
        checksums, stop_requested = self._agree_checksums_and_stop(checksum)
        record = self._step_record(step_time, data_wait, timer, lm_loss, idx_loss, grad_norm, bad)
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

    def _log_step(self, done: int, result: StepResult) -> None:
        """metrics.jsonl, W&B and (every logging.interval steps) the console line."""
        run, record = self.config, result.record
        self.history.append(record)
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": done, "phase": self.phase, **record,
                                    "data_checksum": result.data_checksums}) + "\n")
        self.logger.log(done, {f"train/{k}": v for k, v in record.items()})
        if self.is_main and (done % run.logging.interval == 0 or done == run.train.steps
                             or done == self.start_step + 1):
            recent = [h["step_time_s"] for h in self.history[-20:]]
            eta = format_eta(sum(recent) / len(recent) * (run.train.steps - done))
            mfu = f" | mfu {record['mfu']:.1%}" if "mfu" in record else ""
            self.logger.print(
                f"step {done:>6}/{run.train.steps} | loss {record['loss']:.4f} | lm {record['lm_loss']:.4f} | "
                f"idx {record['indexer_loss']:.4f} | lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f} | "
                f"tok/s {record['tokens_per_s']:,.0f} | wait {record['data_wait_s'] * 1000:.0f}ms{mfu} | "
                f"{self.phase} | eta {eta}")

    def _bad_step_verdict(self, done: int, bad: bool) -> str | None:
        """Count a skipped update; the reason to stop (`bad_step`, `bad_steps`) or None."""
        t = self.config.train
        if not bad:
            self.bad_in_a_row = 0
            return None
        self.bad_total += 1
        self.bad_in_a_row += 1
        self.logger.print(f"step {done}: non-finite loss on at least one rank; update skipped "
                          f"({self.bad_in_a_row} in a row, {self.bad_total} in this run; train.max_bad_steps="
                          f"{t.max_bad_steps})")
        if t.grad_accum_steps > 1:
            # earlier micro-batches of this step already accumulated gradients inside DeepSpeed: stop with a
            # checkpoint of the last applied update (gradients are not saved), so a resume skips this step
            self.logger.print(f"stopping: with train.grad_accum_steps={t.grad_accum_steps} a skipped update "
                              f"needs a restart; checkpoint at step {done}; resume with train.resume=auto")
            return "bad_step"
        if self.bad_in_a_row >= t.max_bad_steps:
            self.logger.print(f"stopping: {self.bad_in_a_row} non-finite losses in a row (train.max_bad_steps="
                              f"{t.max_bad_steps}); checkpoint at step {done} holds the last finite update. "
                              "Lower train.lr or check the data around this step before resuming")
            return "bad_steps"
        return None

    # ---------------------------------------------------------------- evaluation and checkpoints

    def evaluate(self) -> float:
        """Mean validation LM loss per token (collective)."""
        return evaluate(self.engine, self.data, self.config, self.device, self.layout.sp)

    def _log_validation(self, done: int, val_loss: float) -> None:
        self.val_loss = val_loss
        ppl = math.exp(min(val_loss, 50))
        self.logger.log(done, {"val/loss": val_loss, "val/ppl": ppl})
        self.logger.print(f"step {done:>6} | val loss {val_loss:.4f} | ppl {ppl:.1f}")

    def save(self, done: int) -> None:
        """Collective: write, then publish the checkpoint after `done` steps; every rank writes its data state."""
        from data_pipelines import save_data_state

        checkpointing.save_checkpoint(
            self.engine, self.ckpt_dir, done, self.rank, self.world, self.config.train.keep_checkpoints,
            save_rank_state=lambda staging: save_data_state(self.data, staging, self.rank),
            client_state={"step": done}, model_config=self.config.model.to_dict())
        self.last_saved = done

    # ---------------------------------------------------------------- finishing

    def finish(self, stopped_by: str | None) -> dict[str, Any]:
        """Final checkpoint and evaluation (unless stopped), parameter digests, summary.json; every rank."""
        run = self.config
        wall = time.perf_counter() - self.t_start
        self.data.close()
        if self.history and stopped_by is None and self.last_saved != run.train.steps:
            self.save(run.train.steps)
        self.stop.uninstall()
        self.logger.print(f"data (rank {self.rank}): {self.data.describe_stats()}")
        if stopped_by is None:
            self.val_loss = self.evaluate()
        digests = gather_digests(self.engine.module)  # every rank's parameters: equal when the ranks stayed in sync
        if len(set(digests)) > 1:
            self.logger.print(f"warning: parameters differ across ranks at the end: {digests}")
        summary = _summary(self.history, self.val_loss, wall, self.tokens_per_step, run, self.run_dir,
                           self.start_step)
        summary.update(stopped_by=stopped_by, bad_steps=self.bad_total, param_digests=digests,
                       steps=self.start_step + len(self.history))
        if stopped_by is None:
            self.logger.log(run.train.steps, {"val/loss": self.val_loss, "val/ppl": summary["val_ppl"]})
        self.logger.summary(summary)
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.logger.print(format_summary(summary))
        self.logger.finish()
        return summary


def _summary(history, val_loss, wall, tokens_per_step, run, run_dir, start_step) -> dict[str, Any]:
    k = max(1, min(10, len(history) // 4)) if history else 1
    first = [h["lm_loss"] for h in history[:k]]
    last = [h["lm_loss"] for h in history[-k:]]
    steady = [h["tokens_per_s"] for h in history[1:]] or [h["tokens_per_s"] for h in history]
    return {
        "steps": run.train.steps,
        "steps_this_run": len(history),
        "start_step": start_step,
        "tokens_this_run": len(history) * tokens_per_step,
        "lm_loss_start": sum(first) / len(first) if first else float("nan"),
        "lm_loss_end": sum(last) / len(last) if last else float("nan"),
        "loss_window": k,
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50)) if val_loss == val_loss else float("nan"),
        "tokens_per_s": sum(steady) / len(steady) if steady else float("nan"),
        "wall_time_s": wall,
        "run_dir": str(run_dir),
    }


def format_summary(s: dict[str, Any]) -> str:
    return (
        "==== summary ====\n"
        f"steps {s['start_step']}->{s['steps']} | {s['tokens_this_run']:,} tokens | {s['wall_time_s']:.1f} s | "
        f"{s['tokens_per_s']:,.0f} tokens/s\n"
        f"train LM loss {s['lm_loss_start']:.4f} -> {s['lm_loss_end']:.4f} (mean of the first / last "
        f"{s['loss_window']} steps)\n"
        f"validation loss {s['val_loss']:.4f} | perplexity {s['val_ppl']:.1f}\n"
        f"run dir {s['run_dir']} (checkpoints/, config.yaml, metrics.jsonl, summary.json)"
    )
