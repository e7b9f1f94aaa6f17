"""Resuming on a different number of ranks: a 2-rank ZeRO-2 or ZeRO-3 checkpoint, converted automatically to
DeepSpeed's universal format, loads on 1 and on 4 ranks with exactly the parameters it was saved with (digests of
the full parameters; gathered under ZeRO-3), and training goes on."""

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

    for ranks, launcher in ((1, [sys.executable]), (4, torchrun(4))):
        copy = tmp_path / f"on{ranks}"
        shutil.copytree(original, copy)
        # no further steps: the loaded parameters are exactly what the 2 ranks saved
        res = run([*launcher, "train.py", *RUN, "train.steps=4", f"train.output_dir={copy}", "train.resume=auto"],
                  threads=1)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        assert "resuming through a universal checkpoint" in res.stdout
        assert "at step 4" in res.stdout and "data stream restarts" in res.stdout
        assert digests(copy) == [saved[0]] * ranks

    # and training continues on 4 ranks
    more = tmp_path / "on4"
    res = run([*torchrun(4), "train.py", *RUN, "train.steps=6", f"train.output_dir={more}", "train.resume=auto"],
              threads=1)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    steps = [json.loads(line) for line in (more / "metrics.jsonl").read_text().splitlines()]
    first_run = [s for s in steps if s["step"] <= 4]
    resumed = [s for s in steps if s["step"] > 4]
    assert [s["step"] for s in resumed] == [5, 6]
    assert all(s["lm_loss"] < first_run[0]["lm_loss"] for s in resumed)
    assert len(set(digests(more))) == 1
