"""python -m dsv4.export on a checkpoint written by 2 ZeRO-2 ranks: the safetensors + config.json load through
dsv4.build_model and give exactly the logits of a DeepSpeed engine loaded from the same checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import BIN, env, run

ROOT = Path(__file__).resolve().parent.parent

ENGINE_SCRIPT = r'''
import json, sys
import torch
from dsv4.config import ModelConfig
from dsv4.export import load_exported
from dsv4.model import DSV4Model
from dsv4.training.distributed import init_distributed, shutdown
import deepspeed

ckpt_dir, tag, exported = sys.argv[1:4]
init_distributed()
cfg = ModelConfig.from_dict(json.load(open(f"{ckpt_dir}/{tag}/model_config.json")))
model = DSV4Model(cfg, phase="sparse")
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                  config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}})
path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_module_only=True)
assert path is not None
ids = torch.randint(0, cfg.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
engine.eval()
with torch.no_grad():
    reference = engine(ids)
    logits = load_exported(exported)(ids)
print(json.dumps({"equal": bool(torch.equal(reference, logits)),
                  "max_diff": float((reference - logits).abs().max())}))
shutdown(0)
'''


@pytest.mark.slow
@pytest.mark.dist
def test_export_loads_with_build_model_and_matches_engine_logits(tmp_path):
    out = tmp_path / "run"
    res = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "train.py", "train.seq_len=64",
               "train.micro_batch_size=2", "train.steps=3", "train.phases.dense_steps=0",
               "train.phases.indexer_warmup_steps=0", "train.eval_batches=1", "logging.wandb.enabled=false",
               "deepspeed=zero2", f"train.output_dir={out}"], threads=1)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]

    exported = tmp_path / "exported"
    res = run([sys.executable, "-m", "dsv4.export", str(out), "-o", str(exported)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert (exported / "model.safetensors").is_file()
    config = json.loads((exported / "config.json").read_text())
    assert config["compress_ratios"] == [0, 4, 32, 4] and config["hidden_size"] == 128

    script = tmp_path / "engine_logits.py"
    script.write_text(ENGINE_SCRIPT)
    check = subprocess.run([sys.executable, str(script), str(out / "checkpoints"), "step0000003", str(exported)],
                           cwd=ROOT, env=dict(env(2), PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                           timeout=300)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-3000:]
    result = json.loads(check.stdout.strip().splitlines()[-1])
    assert result["equal"], result

    bad = run([sys.executable, "-m", "dsv4.export", str(tmp_path / "nothing-here")])
    assert bad.returncode == 2 and "not a checkpoint directory" in bad.stderr
