"""Issue 19, data: workers die with their trainer however it dies (kill -9); a JSON-lines file given to data.path
stops naming the key; a data.path .txt without <|doc|> separators warns that it is one document; a resume after a
data.num_workers change stops naming the key."""

import json
import os
import signal
import sys
import time

import psutil
import pytest
from test_fault_tolerance import start, wait_for_step

from data_pipelines import StreamingData, prepare_data
from data_pipelines.config import DataConfig
from data_pipelines.packed import DataError


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE  # exited; only its (dead) parent's reaper is missing
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_kill9_of_the_trainer_takes_its_forkserver_and_data_worker_with_it(tmp_path):
    out = tmp_path / "run"
    proc = start([sys.executable, "train.py", "train.seq_len=64", "train.micro_batch_size=1", "train.steps=200",
                  "train.eval_batches=1", "train.save_interval=0", "logging.interval=1",
                  "logging.wandb.enabled=false", "deepspeed=zero0", "data.num_workers=1", "data.shuffle_buffer=0",
                  "train.warmup_steps=1", f"train.output_dir={out}"],
                 tmp_path / "run.log")
    tree = []
    try:
        wait_for_step(proc, out, 1)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert tree, "a run with data.num_workers=1 has a data worker"
        os.kill(proc.pid, signal.SIGKILL)  # the trainer only: its children are orphaned
        proc.wait(timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline and not all(map(_gone, tree)):
            time.sleep(0.1)
        alive = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in tree if not _gone(p)]
        assert not alive, f"survived the trainer by 10 s: {alive}"
    finally:
        for p in tree:  # whatever the outcome, nothing of this run outlives the test
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.kill()


def test_a_json_lines_file_given_to_data_path_stops_naming_the_key(tmp_path):
    rows = "\n".join(json.dumps({"text": f"document {i} about cats"}) for i in range(5)) + "\n"
    for name in ("good.jsonl", "good.txt"):  # by its extension, and by its content under any name
        (tmp_path / name).write_text(rows)
        with pytest.raises(DataError, match=r"data.path=.*JSON lines.*data=jsonl_example data.sources.0.path="):
            prepare_data(DataConfig(path=str(tmp_path / name)))
    (tmp_path / "doc.txt").write_text('{"a": 1} is how a JSON object starts\n<|doc|>\nsecond\n')
    assert len(prepare_data(DataConfig(path=str(tmp_path / "doc.txt"))).sources) == 1  # text stays text


def test_a_data_path_text_without_separators_warns_that_it_is_one_document(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    one = tmp_path / "notes.txt"
    one.write_text("first paragraph\n\nsecond paragraph\n\nthird paragraph\n")
    plan = prepare_data(DataConfig(path=str(one)))
    (warning,) = plan.warnings
    assert f"data.path={one} holds one document" in warning and "<|doc|>" in warning
    assert "sample_by=paragraph" in warning and warning in capsys.readouterr().out
    two = tmp_path / "two.txt"
    two.write_text("first\n<|doc|>\nsecond\n")
    assert prepare_data(DataConfig(path=str(two))).warnings == ()
    assert "warning" not in capsys.readouterr().out
    assert prepare_data(DataConfig()).warnings == ()  # the bundled corpus


@pytest.mark.parametrize("saved,now", [(1, 0), (0, 1), (0, 2)])
def test_a_resume_after_changing_data_num_workers_stops_naming_the_key(saved, now):
    """0 and 1 workers both read one lane: the lane count alone let that change through unnamed; 0 -> 2 named the
    lane counts (1 -> 2) rather than the values the user set."""
    state = json.loads(json.dumps(StreamingData(prepare_data(DataConfig(num_workers=saved)), 32, 1, 0).state_dict()))
    resumed = StreamingData(prepare_data(DataConfig(num_workers=now)), 32, 1, 0)
    with pytest.raises(DataError, match=rf"data.num_workers changed since the checkpoint \({saved} -> {now}\)"):
        resumed.load_state_dict(state)
    StreamingData(prepare_data(DataConfig(num_workers=saved)), 32, 1, 0).load_state_dict(state)  # same: resumes
