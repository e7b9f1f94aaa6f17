"""The recall study's driver (benchmarks/recall.py) end to end at a toy size: two variants train (real train.py runs
on the recall mixture), every checkpoint is evaluated with `--tasks recall`, and the table, the JSON and the three
plots come out; rerunning keeps what is done; bad arguments stop before any work. The full study stays out of CI
(benchmarks/RESULTS.md "Recall")."""

import json
import subprocess
import sys
from pathlib import Path

from test_training import env

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import recall  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
ARGS = ["--toy", "--seeds", "1", "--variants", "v4,window"]


def test_the_recall_driver_runs_end_to_end_and_keeps_finished_work(tmp_path, capsys):
    out = tmp_path / "toy"
    res = subprocess.run([sys.executable, "benchmarks/recall.py", str(out), *ARGS], cwd=ROOT, env=env(1),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in results["variants"]}
    assert set(rows) == {"v4", "window"} and abs(rows["v4"]["params"] - rows["window"]["params"]) < 0.01 * 1e6
    assert set(rows["v4"]["tasks"]) == {"copy", "mqar", "passkey"}
    for run in results["runs"]:
        assert [p["step"] for p in run["points"]] == [2, 4]  # every checkpoint evaluated (toy save_interval 2)
        for point in run["points"]:
            for task in point["recall"]["tasks"].values():
                assert sum(b["answers"] for b in task["buckets"]) == task["answers"] > 0
                assert task["reach"] == 4 * 15  # four 16-token windows
    v4_hits = [p["hits"] for p in results["runs"][0]["points"]]
    assert all(set(h) == {"copy", "mqar", "passkey"} for h in v4_hits)  # read in the sparse phase at step 2 too
    assert all(not p["hits"] for p in results["runs"][1]["points"])  # window-only has no indexer
    table = (out / "results.md").read_text()
    assert "**mqar**" in table and "| v4 | " in table and "| window | " in table
    for name in ("recall_by_distance", "recall_vs_tokens", "indexer_hits"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    evaluations = {p: p.stat().st_mtime_ns for p in (out / "eval").rglob("*.json")}
    assert len(evaluations) == 2 + 1 + 2  # v4: 2 checkpoints + step 2 again in the sparse phase; window: 2
    assert recall.main([str(out), *ARGS]) == 0  # again, in this process: nothing retrains or re-evaluates
    assert "  training " not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in evaluations} == evaluations


def test_bad_arguments_stop_before_any_work(tmp_path, capsys):
    for argv, message in ((["--variants", "window"], "include v4"), (["train.lr=1"], "sets train.lr itself"),
                          (["--eval-docs", "0"], "must be >= 1")):
        try:
            recall.main([str(tmp_path / "x"), *argv])
        except SystemExit as e:
            assert e.code == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_the_ablation_script_trains_reports_and_resumes(tmp_path, capsys):
    """benchmarks/recall_ablation.py at a toy size: each chosen ablation trains in-process and lands in the table;
    the experiment option zeroes and freezes the window layer's attention output; a rerun redoes nothing."""
    import recall_ablation

    out = tmp_path / "abl"
    argv = [str(out), "--only", "csa1,window_csa_zero_out", "--toy", "--jobs", "1"]
    assert recall_ablation.main(argv) == 0
    table = (out / "results.md").read_text()
    assert "| csa1 | [4] |" in table and "| window_csa_zero_out | [0, 4] |" in table
    result = json.loads((out / "csa1.json").read_text())
    assert [p["step"] for p in result["curve"]] == [1, 2, 3] and 0.0 <= result["final_accuracy"] <= 1.0
    model, _, _ = recall_ablation.build(next(a for a in recall_ablation.ABLATIONS
                                             if a.name == "window_csa_zero_out"), seed=0)
    window_out = model.layers[0].attn.wo_b.weight
    assert not window_out.requires_grad and not window_out.any()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert recall_ablation.main(argv) == 0 and "2 already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.json")} == stamps
