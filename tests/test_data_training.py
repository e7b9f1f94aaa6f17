"""train.py on streaming local files: trains, writes every rank's data state next to each checkpoint, resumes
exactly (twice, from a checkpoint a resumed run wrote), logs data-wait time; a bad source stops before training."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data_pipeline import write_jsonl  # noqa: E402
from test_training import env, metrics  # noqa: E402

QUICK = ["train.seq_len=64", "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.warmup_steps=2",
         "logging.interval=1", "train.eval_batches=1", "logging.wandb.enabled=false", "deepspeed=zero1"]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env(2), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_train_on_jsonl_files_resumes_exactly_twice(tmp_path):
    for k in range(4):
        write_jsonl(tmp_path / f"shard{k}.jsonl", "J", k * 40, 40)
    out = tmp_path / "run"
    args = [*QUICK, "data=jsonl_example", f"data.sources.0.path={tmp_path / 'shard*.jsonl'}", "data.num_workers=2",
            "train.steps=6", "train.save_interval=2", f"train.output_dir={out}"]
    first = run(args)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "data mydata (4 json files)" in first.stdout and "data (rank 0): mydata docs 1.000" in first.stdout
    full = metrics(out)
    assert [m["step"] for m in full] == list(range(1, 7))
    assert all(m["data_wait_s"] >= 0 for m in full) and "wait " in first.stdout
    for tag in ("step0000002", "step0000004", "step0000006"):
        state = json.loads((out / "checkpoints" / tag / "data_state_rank0.json").read_text())
        assert state["consumed"] == int(tag[4:]) * 2 and len(state["lanes"]) == 2  # 2 micro-batches per step

    (out / "checkpoints" / "latest").write_text("step0000002")  # as if the job had died after step 2
    second = run([*args, "train.resume=true"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 2" in second.stdout
    resumed = metrics(out)  # one line per step: the resumed run replaced the lines of steps 3-6
    assert [m["step"] for m in resumed] == list(range(1, 7)) and resumed[:2] == full[:2]
    for a, b in zip(full[2:], resumed[2:]):
        assert a["loss"] == b["loss"], (a, b)

    (out / "checkpoints" / "latest").write_text("step0000004")  # written by the resumed run: resume again
    third = run([*args, "train.resume=true"])
    assert third.returncode == 0, third.stderr[-3000:]
    again = metrics(out)
    assert [m["step"] for m in again] == list(range(1, 7)) and again[:4] == resumed[:4]
    for a, b in zip(full[4:], again[4:]):
        assert a["loss"] == b["loss"], (a, b)


def test_unreadable_shard_stops_before_training_naming_it(tmp_path):
    write_jsonl(tmp_path / "good.jsonl", "J", 0, 10)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    out = tmp_path / "run"
    res = run([*QUICK, "data=mixture_example", f"data.sources.1.path={tmp_path / '*.parquet'}",
               f"train.output_dir={out}"])
    assert res.returncode != 0
    assert "data.sources[1].path: cannot read" in res.stderr and "bad.parquet" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "step " not in res.stdout
    assert not out.exists()
