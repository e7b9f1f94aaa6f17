"""Sequence parallelism: every layer type (window, CSA in each phase, HCA, dense via Ulysses) with the sequence
sharded over 2 and 4 CPU ranks equals the single-device model on the full sequence (loss, logits, gradients).
Shards are 16 and 8 tokens with a window of 6, so windows and CSA's overlapping groups cross rank boundaries."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_parity(world: int, shard: int, backend: str, tmp_path: Path, documents: bool = False) -> list[dict]:
    out = tmp_path / f"sp{world}{'docs' if documents else ''}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    if backend == "triton":  # the worker's tensors are on the CPU: the kernels run under the interpreter
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node",
                          str(world), "tests/workers/sp_parity.py", str(shard), backend, str(out),
                          *(["documents"] if documents else [])],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("world,shard", [(2, 16), (4, 8)])
def test_sharded_sequence_equals_single_device(world, shard, documents, tmp_path):
    """documents: packed documents with document masking; documents start inside shards and cross them, so
    compressor groups straddle ranks and ranks own different numbers of entries."""
    results = run_parity(world, shard, "torch", tmp_path, documents)
    assert len(results) == 6
    for r in results:
        case = f"{r['ratios']} {r['phase']}"
        assert abs(r["sp_loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), case
        assert len(r["logits_err_per_rank"]) == world and max(r["logits_err_per_rank"]) <= 1e-5, case
        assert r["worst_grad_rel_err"] <= 1e-4, f"{case}: {r['worst_grad']} off by {r['worst_grad_rel_err']:.2e}"
        if not documents:  # the layer kinds' traffic formula is what the collectives counted
            assert r["bytes_sent"] == pytest.approx(r["bytes_formula"], rel=1e-12), case


@pytest.mark.dist
@pytest.mark.slow
def test_sharded_sequence_on_the_triton_kernels(tmp_path):
    """The same parity on the Triton backend (CPU interpreter): halo'd K=V rows (more rows than queries) and
    document ranges reach the kernels, forward and backward."""
    results = run_parity(2, 16, "triton", tmp_path, documents=True)
    for r in results:
        case = f"{r['ratios']} {r['phase']}"
        assert abs(r["sp_loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), case
        assert len(r["logits_err_per_rank"]) == 2 and max(r["logits_err_per_rank"]) <= 1e-5, case
        assert r["worst_grad_rel_err"] <= 1e-4, case


# ------------------------------------------------------------------ training under DeepSpeed with SP groups

SP_RUN = ["train.steps=5", "train.seq_len=128", "train.micro_batch_size=2", "logging.interval=1",
          "logging.wandb.enabled=false", "train.phases.dense_steps=2", "train.phases.indexer_warmup_steps=1",
          "train.eval_batches=1", "data.num_workers=0"]


def train_run(launcher: list[str], overrides: list[str], out: Path) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    res = subprocess.run([*launcher, "train.py", *SP_RUN, *overrides, f"train.output_dir={out}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def torchrun(n: int) -> list[str]:
    return [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(n)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
@pytest.mark.slow
def test_dp2_sp2_training_matches_dp2_sp1_for_every_zero_stage(tmp_path):
    """4 CPU ranks as 2 data-parallel x 2 sequence-parallel equal 2 data-parallel ranks without SP, step by step,
    for ZeRO-1, 2 (through the real deepspeed launcher) and 3 (reduce-scatter turned off automatically)."""
    ref = train_run(torchrun(2), ["deepspeed=zero1"], tmp_path / "ref")
    assert [m["phase"] for m in ref] == ["dense", "dense", "indexer_warmup", "sparse", "sparse"]
    deepspeed = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "4", "--master_port", str(free_port())]
    for stage, launcher in (("zero1", torchrun(4)), ("zero2", deepspeed), ("zero3", torchrun(4))):
        got = train_run(launcher, [f"deepspeed={stage}", "parallel.sequence_parallel_size=2"], tmp_path / stage)
        for a, b in zip(ref, got):
            for key in ("lm_loss", "indexer_loss"):
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (stage, a["step"], key, a[key], b[key])
        assert len(got) == len(ref)


@pytest.mark.dist
@pytest.mark.slow
def test_sp2_training_with_document_masking_matches_one_rank(tmp_path):
    """data.cross_document_attention=false under sequence parallelism: 2 SP ranks train step for step like one
    rank (every CSA phase), with the bundled corpus' documents packed across the shard boundary."""
    docs = ["data.cross_document_attention=false"]
    ref = train_run([sys.executable], docs, tmp_path / "ref")
    got = train_run(torchrun(2), [*docs, "parallel.sequence_parallel_size=2"], tmp_path / "sp2")
    assert len(got) == len(ref) == 5
    for a, b in zip(ref, got):
        for key in ("lm_loss", "indexer_loss"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])


@pytest.mark.parametrize("sp,seq_len,match", [
    (3, 128, "must divide the number of ranks"),
    (2, 131, "must divide train.seq_len"),
    (4, 96, "multiple of every compression ratio"),
])
def test_bad_sequence_parallel_settings_name_the_key(sp, seq_len, match):
    from dsv4.config import ConfigError, ModelConfig
    from dsv4.training.sequence_parallel import check_sequence_parallel

    with pytest.raises(ConfigError, match=match) as err:
        check_sequence_parallel(sp, 4, seq_len, ModelConfig())
    assert str(err.value).startswith("parallel.sequence_parallel_size")
