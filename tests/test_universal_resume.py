"""Resuming on a different number of ranks: a 2-rank ZeRO-2 or ZeRO-3 checkpoint, converted automatically to
DeepSpeed's universal format, loads on 1 and on 4 ranks with exactly the parameters it was saved with (digests of
the full parameters, printed right after loading; gathered under ZeRO-3), and training goes on."""

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest
from test_training import BIN, run

BASE = ["train.seq_len=128", "train.micro_batch_size=2", "logging.interval=1", "logging.wandb.enabled=false",
        "data.num_workers=0", "train.phases.dense_steps=0", "train.phases.indexer_warmup_steps=0"]


def torchrun(n: int) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(n)]


def digests(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "summary.json").read_text())["param_digests"]


def loaded_digests(stdout: str) -> list[str]:
    """The per-rank parameter digests a run prints right after loading a universal checkpoint."""
    line = next(line for line in stdout.splitlines() if line.startswith("parameters after loading"))
    return ast.literal_eval(line.split(": ", 1)[1])


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_rank_checkpoint_resumes_on_one_and_four_ranks(tmp_path, zero):
    RUN = [*BASE, f"deepspeed={zero}"]  # noqa: N806
    original = tmp_path / "two"
    res = run([*torchrun(2), "train.py", *RUN, "train.steps=4", f"train.output_dir={original}"], threads=1)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    saved = digests(original)
    assert len(saved) == 2 and saved[0] == saved[1]
    assert isinstance(saved[0], str) and len(saved[0]) == 64, "a real digest, ZeRO-3 partitions gathered"
    first_loss = json.loads((original / "metrics.jsonl").read_text().splitlines()[0])["lm_loss"]

    for ranks, launcher in ((1, [sys.executable]), (4, torchrun(4))):
        copy = tmp_path / f"on{ranks}"
        shutil.copytree(original, copy)
        res = run([*launcher, "train.py", *RUN, "train.steps=5", f"train.output_dir={copy}", "train.resume=auto"],
                  threads=1)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        assert "resuming through a universal checkpoint" in res.stdout
        assert "at step 4" in res.stdout and "data stream restarts" in res.stdout
        # the loaded parameters are exactly what the 2 ranks saved, on every rank
        assert loaded_digests(res.stdout) == [saved[0]] * ranks
        # and training goes on
        steps = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps if s["step"] > 4] == [5]
        assert steps[-1]["lm_loss"] < first_loss
        after = digests(copy)
        assert len(after) == ranks and len(set(after)) == 1 and after[0] != saved[0]
