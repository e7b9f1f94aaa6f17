"""The training loop: DeepSpeed engine, AdamW, warmup + cosine LR, clipping, accumulation, CSA phases,
the indexer loss, checkpoints and resume, metrics from global rank 0."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
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
from dsv4.training.sequence_parallel import (
    check_sequence_parallel,
    lm_loss_for_backward,
    setup_sequence_parallel,
    shard_batch,
)
from dsv4.training.signals import StopRequest, write_pid_file


def lr_lambda(train, step: int) -> float:
    """Multiplier of the peak LR at scheduler step `step`: linear warmup, then cosine to min_lr_ratio."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on norm gains, sinks or the compressor's additive slot bias."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or name.endswith(".ape") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(run: RunConfig, use_bf16: bool) -> dict[str, Any]:
    ds, train = run.deepspeed, run.train
    zero: dict[str, Any] = {"stage": ds.zero_stage, "reduce_bucket_size": ds.reduce_bucket_size,
                            "overlap_comm": ds.overlap_comm}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if run.parallel.sequence_parallel_size > 1:  # its reduce-scatter averages over SP ranks (cpu-stack §3.3)
            zero["reduce_scatter"] = False
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16},
        # gradients summed across sequence-parallel ranks stay fp32: bf16 sums drift (pitfall 9)
        "seq_parallel_communication_data_type": "fp32",
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(config, OmegaConf.to_container(OmegaConf.create(ds.extra)) if ds.extra else {})


def _deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def _choose_run_dir(run: RunConfig, rank: int) -> Path:
    """Global rank 0 decides the run directory; every rank gets the same answer."""
    choice = [None]
    if rank == 0:
        if run.train.output_dir:
            path = Path(run.train.output_dir)
        elif isinstance(run.train.resume, str) and run.train.resume != "auto":
            path = _run_dir_of(Path(run.train.resume))
        elif run.train.resume is True or run.train.resume == "auto":
            path = _latest_run_dir() or Path("outputs") / time.strftime("%Y%m%d-%H%M%S")
        else:
            path = Path("outputs") / time.strftime("%Y%m%d-%H%M%S")
        choice = [str(path)]
    dist.broadcast_object_list(choice, src=0)
    return Path(choice[0])


def _run_dir_of(path: Path) -> Path:
    if not path.exists():
        raise ConfigError(f"train.resume={str(path)!r}: no such directory")
    return path.parent if path.name == "checkpoints" else path


def _latest_run_dir() -> Path | None:
    runs = sorted(Path("outputs").glob("*/checkpoints/latest"), key=lambda p: p.stat().st_mtime)
    return runs[-1].parent.parent if runs else None


def _resume_tag(run: RunConfig, ckpt_dir: Path, world: int, logger: MetricsLogger) -> tuple[str | None, bool]:
    """The checkpoint tag to resume from (global rank 0 decides, every rank gets it), or None to start at step 0,
    and whether it was written by another number of ranks (then it is resumed through a universal checkpoint).

    `true` (or a directory): the tag named in `latest`, refused if its manifest says it is incomplete.
    `auto`: the newest checkpoint whose manifest verifies, skipping (with a warning) any that does not."""
    choice: list[Any] = [None, None, False]
    if dist.get_rank() == 0:
        try:
            choice[0], choice[2] = _pick_resume_tag(run, ckpt_dir, world, logger)
            if choice[2]:
                _convert_to_universal(ckpt_dir, choice[0], logger)
        except ConfigError as e:
            choice[1] = str(e)
    dist.broadcast_object_list(choice, src=0)
    if choice[1] is not None:
        raise ConfigError(choice[1])
    return choice[0], choice[2]


UNIVERSAL_SUFFIX = "_universal"


def _convert_to_universal(ckpt_dir: Path, tag: str, logger: MetricsLogger) -> None:
    """DeepSpeed's universal format (layout-free: loads on any number of ranks), written once next to the tag."""
    import subprocess
    import sys

    target = ckpt_dir / (tag + UNIVERSAL_SUFFIX)
    if (target / "zero").is_dir():
        return
    logger.print(f"converting {ckpt_dir / tag} to a universal checkpoint in {target}")
    res = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                          str(ckpt_dir / tag), "--output_folder", str(target), "--inject_missing_state",
                          "--num_extract_workers", "1", "--num_merge_workers", "1"], capture_output=True, text=True)
    if res.returncode != 0:
        raise ConfigError(f"train.resume: converting {ckpt_dir / tag} to a universal checkpoint failed: "
                          f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")


def _pick_resume_tag(run: RunConfig, ckpt_dir: Path, world: int, logger: MetricsLogger) -> tuple[str | None, bool]:
    resume = run.train.resume
    if resume == "auto":
        found = checkpointing.newest_complete(ckpt_dir, logger.print)
        if found is None:
            logger.print(f"train.resume=auto: no complete checkpoint in {ckpt_dir}; starting from step 0")
            return None, False
        logger.print(f"train.resume=auto: newest complete checkpoint is {found.path} (step {found.step})")
        tag = found.tag
    else:
        latest = ckpt_dir / checkpointing.LATEST
        if not latest.is_file():
            if isinstance(resume, str):
                raise ConfigError(f"train.resume={resume!r}: no checkpoint ('latest') in {ckpt_dir}")
            logger.print(f"train.resume=true: no checkpoint in {ckpt_dir}; starting from step 0")
            return None, False
        tag = latest.read_text().strip()
        problem = checkpointing.verify_checkpoint(ckpt_dir / tag)
        if problem is not None and (ckpt_dir / tag / checkpointing.MANIFEST).is_file():
            raise ConfigError(f"train.resume={resume!r}: {ckpt_dir / tag} (named in {latest}) is incomplete: "
                              f"{problem}. Use train.resume=auto to take the newest complete checkpoint")
        if problem is not None:
            logger.print(f"warning: {ckpt_dir / tag} has no {checkpointing.MANIFEST}; loading it unverified")
    manifest_file = ckpt_dir / tag / checkpointing.MANIFEST
    if manifest_file.is_file():
        written_by = checkpointing.read_manifest(ckpt_dir / tag).get("world_size")
        if written_by is not None and written_by != world:
            logger.print(f"train.resume: {ckpt_dir / tag} was written by {written_by} ranks, this run has {world}: "
                         "resuming through a universal checkpoint")
            return tag, True
    return tag, False


def _mean_across_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


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
    run = resolve_config(cfg)  # bad values stop here, before any process group or data
    from data_pipelines import StreamingData, load_data_state, prepare_data, save_data_state

    data_plan = prepare_data(run.data)  # missing files, unreadable shards, a bad tokenizer stop here
    if data_plan.vocab_size > run.model.vocab_size:
        raise ConfigError(f"model.vocab_size={run.model.vocab_size}: smaller than the tokenizer's vocabulary "
                          f"({data_plan.vocab_size}); raise it")

    import deepspeed

    rank, world, _, device = init_distributed()
    use_bf16 = run.deepspeed.precision == "bf16" or (run.deepspeed.precision == "auto" and device.type == "cuda")
    run_dir = _choose_run_dir(run, rank)
    ckpt_dir = run_dir / "checkpoints"
    is_main = rank == 0
    resolved = run_config_dict(run)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    logger = MetricsLogger(run.logging.wandb, run_dir, is_main, resolved)

    # sequence parallelism: SP groups of consecutive ranks share a data-parallel rank and split each sequence
    check_sequence_parallel(run.parallel.sequence_parallel_size, world, run.train.seq_len, run.model)
    layout = setup_sequence_parallel(run.parallel.sequence_parallel_size, rank, world, run.train.seq_len)
    sp_size = layout.sp_size

    torch.manual_seed(run.train.seed)
    model = DSV4Model(run.model, backend=run.attention.backend, chunk_size=run.attention.query_chunk_size,
                      phase=phase_for_step(run.train, 0), deterministic=run.attention.deterministic)
    model.set_sequence_parallel(layout.sp)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(param_groups(model, run.train.weight_decay), lr=run.train.lr,
                                  betas=tuple(run.train.betas), eps=run.train.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(run.train, s))
    # the checkpoint to resume from is chosen first: another rank count needs the universal loader configured
    tag, universal = _resume_tag(run, ckpt_dir, world, logger) if run.train.resume else (None, False)
    ds_config = deepspeed_config(run, use_bf16)
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        **({"mpu": layout.mpu} if layout.mpu is not None else {}))

    dp_rank, dp_world = layout.dp_rank, layout.dp_world  # the ranks of one SP group read the same samples
    data = StreamingData(data_plan, run.train.seq_len, run.train.micro_batch_size, run.train.seed, dp_rank, dp_world)

    last_saved = -1

    def save(done: int) -> None:
        """Write, then publish (dsv4/training/checkpointing.py); every rank writes its own data state file."""
        nonlocal last_saved
        checkpointing.save_checkpoint(
            engine, ckpt_dir, done, rank, world, run.train.keep_checkpoints,
            save_rank_state=lambda staging: save_data_state(data, staging, rank),
            client_state={"step": done}, model_config=run.model.to_dict())
        last_saved = done

    start_step = 0
    if tag is not None:
        load_tag = tag + UNIVERSAL_SUFFIX if universal else tag
        load_path, client = engine.load_checkpoint(str(ckpt_dir), tag=load_tag)
        if load_path is None:
            raise ConfigError(f"train.resume={run.train.resume!r}: DeepSpeed could not load {ckpt_dir / load_tag}")
        start_step = int(client["step"])
        if universal:  # per-rank stream positions cannot follow a new rank layout: the stream restarts, reseeded
            data = StreamingData(data_plan, run.train.seq_len, run.train.micro_batch_size,
                                 run.train.seed + start_step, dp_rank, dp_world)
            logger.print("warning: the data stream restarts (reseeded) after a rank-count change; resumed samples "
                         "are not the ones the original run would have read")
        else:
            load_data_state(data, ckpt_dir / tag, rank)  # this rank's stream position at that checkpoint
        logger.print(f"resumed from {load_path} at step {start_step}")
        last_saved = start_step

    tokens_per_step = run.train.micro_batch_size * run.train.grad_accum_steps * dp_world * run.train.seq_len
    kinds = [run.model.layer_kind(i) for i in range(run.model.num_hidden_layers)]
    logger.print(
        f"dsv4-train | {n_params / 1e6:.2f}M params | layers {kinds} | ranks {world} on {device.type} "
        f"(data parallel {dp_world} x sequence parallel {sp_size}) | "
        f"ZeRO-{run.deepspeed.zero_stage} {'bf16' if use_bf16 else 'fp32'} | {tokens_per_step} tokens/step | "
        f"data {data_plan.describe()} | run dir {run_dir}")

    stop = StopRequest()
    stop.install()
    write_pid_file(run_dir, rank)
    n_matmul = flops.matmul_params(engine.module)
    peak, peak_source = flops.peak_flops_per_rank(run.logging.peak_tflops, device)
    logger.print(f"MFU: {peak_source}")
    sequences_per_step = run.train.micro_batch_size * run.train.grad_accum_steps * dp_world
    flops_per_step = {p: sequences_per_step * flops.training_flops_per_sequence(run.model, run.train.seq_len, p,
                                                                                 n_matmul)
                      for p in ("dense", "indexer_warmup", "sparse")}
    bad_in_a_row = bad_total = 0
    stopped_by: str | None = None

    history: list[dict[str, float]] = []
    val_loss = float("nan")
    t_start = time.perf_counter()
    phase = None
    batches = data.batches()
    for step in range(start_step, run.train.steps):
        new_phase = phase_for_step(run.train, step)
        if new_phase != phase:
            engine.module.set_attention_options(phase=new_phase)
            if phase is not None or step > 0:
                logger.print(f"step {step}: CSA attention phase -> {new_phase}")
            phase = new_phase
        t0 = time.perf_counter()
        lm_sum = idx_sum = data_wait = 0.0
        timer = StepTimer(device)
        bad_step = False  # a non-finite loss on any rank: this step's update is skipped (train.max_bad_steps)
        checksum = 0
        # rank 0 records sink mass and indexer recall on logging steps (first micro-batch; no collectives involved)
        engine.module.options.collect_stats = is_main and (step + 1) % run.logging.interval == 0
        for _ in range(run.train.grad_accum_steps):
            t_wait = time.perf_counter()
            batch = next(batches)  # input_ids, labels, doc_ids, positions: [B, S]
            data_wait += time.perf_counter() - t_wait
            checksum = (checksum + batch_checksum(batch["input_ids"])) % CHECKSUM_MOD
            if bad_step:  # the rest of a skipped step: its data is consumed (the order stays), nothing computed
                continue
            batch = shard_batch(batch, layout.sp)  # this rank's part of each sequence (all of it without SP)
            with timer("forward"):
                out = engine(batch["input_ids"].to(device), labels=batch["labels"].to(device),
                             positions=doc_positions(batch, run, device))
                engine.module.options.collect_stats = False
                lm_loss = lm_loss_for_backward(out, layout.sp)  # local sum / the sequence's token count under SP
                loss = lm_loss
                if out.indexer_loss is not None:
                    loss = loss + run.train.indexer_loss_coef * out.indexer_loss
            if not all_finite(loss, device):  # every rank agrees, so every rank skips the same update
                bad_step = True
                continue
            if out.indexer_loss is not None:
                idx_sum += out.indexer_loss.item() * sp_size  # SP ranks hold parts of one loss: x sp, then
            with timer("backward"):
                engine.backward(loss)
            with timer("optimizer"):
                engine.step()
            lm_sum += lm_loss.item() * sp_size  # the mean over all ranks below sums the SP parts
        step_time = time.perf_counter() - t0
        grad_norm = engine.get_global_grad_norm()  # DeepSpeed's global norm, taken before clipping
        grad_norm = float(grad_norm) if grad_norm is not None and not bad_step else float("nan")
        lm_loss, idx_loss = _mean_across_ranks([lm_sum / run.train.grad_accum_steps,
                                                idx_sum / run.train.grad_accum_steps], device)
        if bad_step:
            lm_loss = idx_loss = float("nan")
        total = lm_loss + run.train.indexer_loss_coef * idx_loss
        lr = scheduler.get_last_lr()[0] if scheduler is not None else run.train.lr
        # one collective per step: each rank's data checksum (its slot) and the stop flag (last slot)
        flags = torch.zeros(world + 1, dtype=torch.float64, device=device)
        flags[rank] = checksum
        flags[world] = 1.0 if stop.requested else 0.0
        dist.all_reduce(flags)
        step_flops = flops_per_step[phase]
        record = {"loss": total, "lm_loss": lm_loss, "indexer_loss": idx_loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time, "data_wait_s": data_wait,
                  "forward_s": timer.totals.get("forward", 0.0), "backward_s": timer.totals.get("backward", 0.0),
                  "optimizer_s": timer.totals.get("optimizer", 0.0),
                  "tflops_per_rank": step_flops / step_time / world / 1e12,
                  "peak_mem_gb": peak_memory_bytes(device) / 2**30, "bad_steps": float(bad_total + bad_step)}
        if peak is not None:
            record["mfu"] = step_flops / step_time / (peak * world)
        record.update(engine.module.attention_stats())  # sink_mass, indexer_recall (logging steps, rank 0)
        if len(data_plan.sources) > 1:  # realised mixture (this rank's documents so far)
            stats = data.stats()
            total_docs = sum(stats["docs"].values()) or 1
            record.update({f"mix_docs/{name}": n / total_docs for name, n in stats["docs"].items()})
        history.append(record)
        if is_main:
            checksums = [int(c) for c in flags[:world].tolist()]
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step + 1, "phase": phase, **record, "data_checksum": checksums}) + "\n")
        logger.log(step + 1, {f"train/{k}": v for k, v in record.items()})
        done = step + 1
        if is_main and (done % run.logging.interval == 0 or done == run.train.steps or step == start_step):
            recent = [h["step_time_s"] for h in history[-20:]]
            eta = format_eta(sum(recent) / len(recent) * (run.train.steps - done))
            mfu = f" | mfu {record['mfu']:.1%}" if "mfu" in record else ""
            logger.print(f"step {done:>6}/{run.train.steps} | loss {total:.4f} | lm {lm_loss:.4f} | "
                         f"idx {idx_loss:.4f} | lr {lr:.2e} | gnorm {grad_norm:.3f} | "
                         f"tok/s {record['tokens_per_s']:,.0f} | wait {data_wait * 1000:.0f}ms{mfu} | {phase} | "
                         f"eta {eta}")
        if bad_step:
            bad_total += 1
            bad_in_a_row += 1
            logger.print(f"step {done}: non-finite loss on at least one rank; update skipped "
                         f"({bad_in_a_row} in a row, {bad_total} in this run; train.max_bad_steps="
                         f"{run.train.max_bad_steps})")
            if run.train.grad_accum_steps > 1:
                # earlier micro-batches of this step already accumulated gradients inside DeepSpeed: stop with a
                # checkpoint of the last applied update (gradients are not saved), so a resume skips this step
                stopped_by = "bad_step"
                logger.print(f"stopping: with train.grad_accum_steps={run.train.grad_accum_steps} a skipped update "
                             f"needs a restart; checkpoint at step {done}; resume with train.resume=auto")
            elif bad_in_a_row >= run.train.max_bad_steps:
                stopped_by = "bad_steps"
                logger.print(f"stopping: {bad_in_a_row} non-finite losses in a row (train.max_bad_steps="
                             f"{run.train.max_bad_steps}); checkpoint at step {done} holds the last finite update. "
                             "Lower train.lr or check the data around this step before resuming")
        else:
            bad_in_a_row = 0
        if flags[world].item() > 0 and stopped_by is None:
            stopped_by = "signal"
            logger.print(f"step {done}: stop signal received ({stop.signal_name or 'on another rank'}); "
                         f"checkpointing and exiting")
        if stopped_by is not None:
            save(done)
            break
        if run.train.eval_interval and done % run.train.eval_interval == 0 and done < run.train.steps:
            val_loss = evaluate(engine, data, run, device, layout.sp)
            logger.log(done, {"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50))})
            logger.print(f"step {done:>6} | val loss {val_loss:.4f} | ppl {math.exp(min(val_loss, 50)):.1f}")
        if run.train.save_interval and done % run.train.save_interval == 0 and done < run.train.steps:
            save(done)

    wall = time.perf_counter() - t_start
    data.close()
    if history and stopped_by is None and last_saved != run.train.steps:
        save(run.train.steps)
    stop.uninstall()
    logger.print(f"data (rank {rank}): {data.describe_stats()}")
    if stopped_by is None:
        val_loss = evaluate(engine, data, run, device, layout.sp)
    digests = gather_digests(engine.module)  # every rank's parameters: equal when the ranks stayed in sync
    if len(set(digests)) > 1:
        logger.print(f"warning: parameters differ across ranks at the end: {digests}")
    summary = _summary(history, val_loss, wall, tokens_per_step, run, run_dir, start_step)
    summary.update(stopped_by=stopped_by, bad_steps=bad_total, param_digests=digests,
                   steps=start_step + len(history))
    if stopped_by is None:
        logger.log(run.train.steps, {"val/loss": val_loss, "val/ppl": summary["val_ppl"]})
    logger.summary(summary)
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.print(format_summary(summary))
    logger.finish()
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
