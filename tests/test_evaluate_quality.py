"""The quality experiment's driver (benchmarks/quality.py) end to end at a toy size: every variant trains (real
train.py runs), is evaluated, and lands in the table, the JSON and the four plots, with parameter counts matched;
rerunning the same command keeps what is done; the LR choice and bad arguments. The full experiment stays out of
CI (README "Quality")."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import env

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def run_driver(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/quality.py", str(out), "--toy", "--seeds", "1", "--lrs", "3e-3",
                           "--passkey-per-cell", "1", "--eval-batches", "1", *args],
                          cwd=ROOT, env=env(1), capture_output=True, text=True, timeout=600)


def test_the_driver_runs_every_variant_end_to_end_and_keeps_finished_work(tmp_path, capsys):
    out = tmp_path / "toy"
    res = run_driver(out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in results["variants"]}
    assert set(rows) == {"v4", "dense", "window"}
    v4 = rows["v4"]["params"]
    assert all(abs(r["params"] - v4) / v4 < 0.01 for r in rows.values())  # equal parameter counts
    assert rows["dense"]["layers"] == ["dense"] * 4 and rows["window"]["layers"] == ["window"] * 4
    assert len({r["tokens"] for r in rows.values()}) == 1  # equal tokens
    assert all(set(r["passkey"]) == {"64", "128"} for r in rows.values())  # 2W and 4W fit the toy's 128 tokens
    assert rows["v4"]["indexer_recall"] is not None and rows["dense"]["indexer_recall"] is None
    assert all(math.isfinite(r["val_loss"][0]) and math.isfinite(r["loss_beyond_window"][0]) for r in rows.values())
    for run in results["runs"]:
        assert [step for step, _ in run["val_curve"]] == [2, 3]  # toy eval_interval 2, then the end
    table = (out / "results.md").read_text()
    for variant in rows:
        assert f"| {variant} | {rows[variant]['params'] / 1e6:.3f}M |" in table
    for name in ("val_loss", "loss_by_position", "passkey", "indexer_recall"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    logs = {p: p.stat().st_mtime_ns for p in (out / "logs").glob("*.log")}
    assert len(logs) == 3
    # the same command again (in this process, to save a start-up): everything is kept, nothing retrains
    argv = [str(out), "--toy", "--seeds", "1", "--lrs", "3e-3", "--passkey-per-cell", "1", "--eval-batches", "1"]
    assert quality.main(argv) == 0
    assert "  training " not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in logs} == logs
    # other settings for an existing run stop before any work, naming the run
    job = quality.Job("v4-lr0.003-seed0", "v4", 3e-3, 0, False, ["model.index_topk=8"])
    with pytest.raises(SystemExit, match="started with other settings"):
        quality.run_training(job, out)

def test_the_lr_choice_is_the_lowest_validation_loss_and_never_a_diverged_trial():
    trials = [{"lr": 1e-3, "val_loss": 5.1}, {"lr": 3e-3, "val_loss": 4.9}, {"lr": 1e-2, "val_loss": float("nan")}]
    assert quality.choose_lr(trials) == 3e-3
    assert quality.choose_lr([{"lr": 1e-2, "val_loss": 9.0}, {"lr": 1e-3, "val_loss": 7.0}]) == 1e-3
    with pytest.raises(RuntimeError, match="every learning-rate trial diverged"):
        quality.choose_lr([{"lr": 1e-2, "val_loss": float("inf")}])


@pytest.mark.parametrize("argv,message", [
    (["--variants", "v4,mamba"], "--variants=v4,mamba: choose from"),
    (["--variants", "dense,window"], "include v4"),
    (["train.lr=1e-3"], "the driver sets train.lr itself"),
    (["attention=dense"], "the driver sets attention itself"),
    (["--lrs", "3e-3,fast"], "--lrs=3e-3,fast"),
])
def test_bad_arguments_name_what_is_wrong(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        quality.main([str(tmp_path / "x"), *argv])
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- the ablation (benchmarks/quality_ablation.py)

ABLATION_MODEL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=2,
                      head_dim=16, qk_rope_head_dim=4, q_lora_rank=16, o_groups=1, o_lora_rank=8, sliding_window=4,
                      index_n_heads=2, index_head_dim=8, index_topk=2, num_key_value_heads=1, dense_head_dim=8)


@pytest.mark.parametrize("ratios", [[4, 8], [-1, -1]])  # CSA + HCA, dense
def test_restricted_to_the_window_a_model_sees_no_further_back_than_its_layers_of_windows(ratios):
    import torch
    from quality_ablation import restricted

    from dsv4.config import ModelConfig
    from dsv4.model import DSV4Model

    torch.manual_seed(0)
    model = DSV4Model(ModelConfig(**ABLATION_MODEL, compress_ratios=ratios), backend="torch", phase="sparse").eval()
    ids = torch.randint(0, 97, (1, 40))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 97
    reach = 2 * (4 - 1)  # two layers of a 4-token window: position p sees back to p - 6
    with torch.no_grad():
        full_diff = (model(ids) - model(changed)).abs().amax(-1)[0]
        with restricted(model, 4, ("csa", "hca")):
            cut_diff = (model(ids) - model(changed)).abs().amax(-1)[0]
        after = (model(ids) - model(changed)).abs().amax(-1)[0]
    assert full_diff[reach + 1:].max() > 1e-4  # as trained, token 0 reaches the end (compressed entries, dense)
    assert cut_diff[:reach + 1].max() > 1e-4 and cut_diff[reach + 1:].max() == 0  # restricted: only the window
    assert torch.equal(after, full_diff)  # and the model is as it was after the block


def test_the_far_swap_moves_only_a_model_that_sees_that_far():
    import torch
    from quality_ablation import far_swap

    from dsv4.config import ModelConfig
    from dsv4.model import DSV4Model

    ids = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids, "labels": ids.roll(-1, dims=1)}]
    rises = {}
    for ratios in ([0, 0], [-1, -1]):  # window-only (reach 2 x 3 + 1 = 7 tokens), dense
        torch.manual_seed(0)
        model = DSV4Model(ModelConfig(**ABLATION_MODEL, compress_ratios=ratios), backend="torch").eval()
        with torch.no_grad():
            rises[ratios[0]] = far_swap(model, batches, swap=10, start=17)
            within_reach = far_swap(model, batches, swap=10, start=12)
        assert abs(within_reach["rise"]) > 1e-4  # read inside the reach, the swap shows in either model
    assert rises[0]["rise"] == 0 and rises[0]["tokens"] == 3 * 23  # past the reach: window-only cannot see it
    assert abs(rises[-1]["rise"]) > 1e-4  # dense can
