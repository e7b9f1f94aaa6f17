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


def run_parity(world: int, shard: int, backend: str, tmp_path: Path) -> list[dict]:
    out = tmp_path / f"sp{world}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    res = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node",
                          str(world), "tests/workers/sp_parity.py", str(shard), backend, str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("world,shard", [(2, 16), (4, 8)])
def test_sharded_sequence_equals_single_device(world, shard, tmp_path):
    results = run_parity(world, shard, "torch", tmp_path)
    assert len(results) == 6
    for r in results:
        case = f"{r['ratios']} {r['phase']}"
        assert abs(r["sp_loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), case
        assert r["logits_err"] <= 1e-5, case
        assert r["worst_grad_rel_err"] <= 1e-4, f"{case}: {r['worst_grad']} off by {r['worst_grad_rel_err']:.2e}"
