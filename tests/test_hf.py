"""Our model as transformers' own DeepseekV4ForCausalLM (dsv4/hf.py, `python -m dsv4.export --format hf`): HF's
logits equal ours, HF's greedy generate equals dsv4's, the export loads offline with no missing or unexpected keys,
and what HF cannot express is refused with a message naming the layer.

Top-k ties: where the CSA indexer's scores tie exactly at the top-k cut (every head's ReLU score 0), HF's
torch.topk picks in an undefined order and we pick the most recent entry. These tests hand both the same picks:
a forward hook on HF's indexer scorer adds index * 1e-30 to every score, which orders exact ties most recent
first (as ours) and is absorbed by any nonzero score, so every row is compared.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_evaluate import TASK_YAML
from test_training import ROOT, env, run

from data_pipelines.tokenizer import TokenizerSpec, eos_id_of, load_tokenizer
from dsv4 import build_model
from dsv4.config import ConfigError, ModelConfig
from dsv4.hf import (
    check_hf_expressible,
    from_hf_config,
    from_hf_state_dict,
    hf_config,
    hf_refusals,
    to_hf_state_dict,
    write_hf_directory,
)
from dsv4.inference.generate import generate_ids
from dsv4.loading import initial_weights, load_model

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_modeling  # noqa: E402

TINY = dict(vocab_size=4096, hidden_size=64, intermediate_size=96, num_attention_heads=4, head_dim=32,
            qk_rope_head_dim=8, q_lora_rank=32, o_groups=2, o_lora_rank=32, sliding_window=8, index_n_heads=2,
            index_head_dim=16, index_topk=4)
TOLERANCE = 1e-5  # max abs error / max abs logit


def tiny_model(ratios: list[int], phase: str = "sparse", seed: int = 0):
    """A random fp32 model whose norms, slot biases and sinks are perturbed too (each name in the map matters)."""
    torch.manual_seed(seed)
    model = build_model(dict(TINY, compress_ratios=ratios, num_hidden_layers=len(ratios)), phase=phase).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 or name.endswith("ape"):
                param.add_(0.2 * torch.randn_like(param))
    return model


def bundled_tokenizer():
    spec = TokenizerSpec(None, None)
    tokenizer = load_tokenizer(spec)
    return tokenizer, eos_id_of(tokenizer, spec)


def same_picks_on_ties(hf_model) -> None:
    """Break exact top-k ties in HF's indexer toward the most recent entry, as ours does (module docstring)."""
    def most_recent_first(module, args, scores):
        return scores + torch.arange(scores.shape[-1], dtype=scores.dtype) * 1e-30

    for module in hf_model.modules():
        if isinstance(module, hf_modeling.DeepseekV4IndexerScorer):
            module.register_forward_hook(most_recent_first)


def to_hf(model, out: Path, phase: str = "sparse", eos_id: int | None = None):
    tokenizer, bundled_eos = bundled_tokenizer()
    eos_id = bundled_eos if eos_id is None else eos_id
    write_hf_directory(out, model.config, model.state_dict(), tokenizer, eos_id, phase)
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert type(hf_model).__name__ == "DeepseekV4ForCausalLM"
    same_picks_on_ties(hf_model)
    return hf_model.eval()


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / ours.abs().max())


# window 8, CSA groups of 4 (top-4 of up to 9 entries), HCA groups of 8 and 16. Every row of a causal forward is
# compared, so one sequence of 37 tokens crosses every group and window boundary up to 37; 10 ends mid-group.
@pytest.mark.parametrize("ratios,phase", [
    ([0, 0], "sparse"),  # window only
    ([4, 0], "dense"),  # CSA in each phase the export supports
    ([4, 0], "indexer_warmup"),
    ([0, 4, 16, 4], "sparse"),  # the tiny preset's shape: window, CSA, HCA
    ([8, 4, 8], "sparse"),  # another HCA ratio
])
def test_hf_logits_equal_ours(tmp_path, ratios, phase):
    model = tiny_model(ratios, phase)
    hf_model = to_hf(model, tmp_path / "hf", phase)
    ids = torch.randint(0, TINY["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for length in (10, 37):
            ours, theirs = model(ids[:, :length]), hf_model(ids[:, :length]).logits
            assert relative_error(ours, theirs) <= TOLERANCE, (ratios, phase, length)


def test_hf_greedy_generate_equals_ours(tmp_path):
    """HF generate (its own cache) against dsv4's KV-cache decode, both stopping at the same EOS: a 13-token prompt
    (CSA / HCA groups open), 20 new tokens decoding through several groups and past the window."""
    model = tiny_model([0, 4, 16, 4])
    eos_id = TINY["vocab_size"] - 1  # a random model soon emits the bundled EOS (0); this id lets it run longer
    hf_model = to_hf(model, tmp_path / "hf", eos_id=eos_id)
    prompt = torch.randint(0, TINY["vocab_size"], (1, 13), generator=torch.Generator().manual_seed(2))
    ours, _ = generate_ids(model, prompt.tolist(), max_new_tokens=20, eos_id=eos_id)
    with torch.no_grad():
        theirs = hf_model.generate(prompt, max_new_tokens=20, do_sample=False)
    assert len(ours[0]) >= 10
    assert theirs[0, 13:].tolist() == ours[0]


def test_refusals_name_the_layer(tmp_path):
    cfg = ModelConfig(**dict(TINY, compress_ratios=[0, 4, -1, 4]))
    assert hf_refusals(cfg) == ["compress_ratios[2]=-1: a dense GQA layer; HF's DeepseekV4 has only window, CSA "
                                "and HCA layers"]
    cfg = ModelConfig(**dict(TINY, compress_ratios=[8, 4, 16, 8]))
    assert hf_refusals(cfg) == ["compress_ratios[2]=16: HCA ratio differs from compress_ratios[0]=8; HF's "
                                "DeepseekV4 has one ratio for all HCA layers (compress_rates)"]
    cfg = ModelConfig(**dict(TINY, head_dim=88, qk_rope_head_dim=30, index_head_dim=32))
    assert hf_refusals(cfg) == ["qk_rope_head_dim=30: HF recomputes it as int(head_dim * partial_rotary_factor), "
                                "which rounds it to another value for head_dim=88"]
    with pytest.raises(ConfigError, match=r"cannot express this model: compress_ratios\[2\]=16.*--format dsv4"):
        check_hf_expressible(ModelConfig(**dict(TINY, compress_ratios=[8, 4, 16, 8])))
    model = build_model(dict(TINY, compress_ratios=[0, -1], num_hidden_layers=2))
    tokenizer, eos_id = bundled_tokenizer()
    with pytest.raises(ConfigError, match=r"compress_ratios\[1\]=-1"):
        write_hf_directory(tmp_path / "refused", model.config, model.state_dict(), tokenizer, eos_id)
    assert not (tmp_path / "refused").exists()  # refused before anything was written


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A 2-step run of the tiny model (single process), the shape of the Quickstart's."""
    out = tmp_path_factory.mktemp("hf") / "run"
    res = run([sys.executable, "train.py", "train.seq_len=64", "train.micro_batch_size=2", "train.steps=2",
               "train.phases.dense_steps=0", "train.phases.indexer_warmup_steps=0", "train.eval_batches=1",
               "logging.wandb.enabled=false", f"train.output_dir={out}"])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def hf_export(trained_run, tmp_path_factory) -> tuple[Path, str]:
    """`python -m dsv4.export RUN --format hf -o DIR` on the run: (DIR, the command's stdout)."""
    out = tmp_path_factory.mktemp("hf_export") / "hf"
    res = run([sys.executable, "-m", "dsv4.export", str(trained_run), "--format", "hf", "-o", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stdout


def test_export_format_hf_loads_offline_with_equal_logits(trained_run, hf_export):
    out, stdout = hf_export
    assert stdout.strip().splitlines()[-1] == f"exported {out / 'model.safetensors'} and {out / 'config.json'}"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v4" and config["hc_mult"] == 1 and config["n_routed_experts"] == 1
    assert config["layer_types"] == ["sliding_attention", "compressed_sparse_attention",
                                     "heavily_compressed_attention", "compressed_sparse_attention"]

    ours = load_model(trained_run)
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    same_picks_on_ties(hf_model.eval())
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "It was a dark and stormy night; the rain fell in torrents, except at occasional intervals. " * 3
    ids = hf_tokenizer(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == ours.tokenizer.encode(text).ids
    assert hf_tokenizer.eos_token_id == ours.eos_id == hf_model.generation_config.eos_token_id
    with torch.no_grad():
        assert relative_error(ours.model(ids), hf_model(ids).logits) <= TOLERANCE


def test_export_format_hf_refuses_before_any_work(trained_run, tmp_path, monkeypatch):
    import dsv4.export as export_module

    dense = ModelConfig(compress_ratios=[0, 4, -1, 4])
    monkeypatch.setattr(export_module, "checkpoint_model_config", lambda ckpt_dir, tag: dense)

    def merged(*args):
        raise AssertionError("the checkpoint was merged before the refusal")

    monkeypatch.setattr(export_module, "consolidated_state_dict", merged)
    with pytest.raises(ConfigError, match=r"compress_ratios\[2\]=-1: a dense GQA layer"):
        export_module.export(trained_run, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()
    assert export_module.main([str(trained_run), "--format", "hf", "-o", str(tmp_path / "hf")]) == 2


def test_hf_directory_reads_back_as_ours(tmp_path):
    """dsv4.loading reads an HF export (any command taking an export directory does): the same model, same phase."""
    model = tiny_model([0, 4, 16, 4], phase="dense")
    to_hf(model, tmp_path / "hf", phase="dense")
    loaded = load_model(tmp_path / "hf")
    assert loaded.config == model.config and loaded.phase == "dense"  # index_topk kept despite HF's larger one
    ids = torch.randint(0, TINY["vocab_size"], (1, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), model(ids))


def test_hf_import_refuses_what_this_project_does_not_train():
    cfg = ModelConfig(**dict(TINY, compress_ratios=[0, 4], num_hidden_layers=2))
    plain = hf_config(cfg, eos_id=0)
    for change, feature in [({"hc_mult": 4}, r"hc_mult=4: mHC hyper-connections"),
                            ({"n_routed_experts": 8}, r"n_routed_experts=8: routed MoE experts"),
                            ({"mlp_layer_types": ["hash_moe", "moe"]}, r"mlp_layer_types\[0\]=hash_moe: hash-routed"),
                            ({"num_nextn_predict_layers": 1}, r"num_nextn_predict_layers=1: MTP layers"),
                            ({"swiglu_limit": 10.0}, r"swiglu_limit=10.0: a clamped SwiGLU")]:
        with pytest.raises(ConfigError, match=feature + r".*does not train it yet"):
            from_hf_config({**plain, **change}, "config.json")
    state = to_hf_state_dict(cfg, build_model(cfg).state_dict())
    assert set(from_hf_state_dict(cfg, state)) == set(build_model(cfg).state_dict())
    with pytest.raises(ConfigError, match=r"mtp.0.enorm.weight: MTP weights; this project does not train"):
        from_hf_state_dict(cfg, {**state, "mtp.0.enorm.weight": torch.ones(TINY["hidden_size"])})
    routed = dict(state)
    routed["model.layers.1.mlp.experts.down_proj"] = torch.ones_like(routed["model.layers.1.mlp.experts.down_proj"])
    with pytest.raises(ConfigError, match=r"experts.down_proj is not the plain form's: routed MoE experts"):
        from_hf_state_dict(cfg, routed)
    mixing = dict(state)
    mixing["model.layers.0.attn_hc.fn"] = torch.full_like(mixing["model.layers.0.attn_hc.fn"], 0.1)
    with pytest.raises(ConfigError, match=r"attn_hc.fn is not the plain form's: trained mHC hyper-connections"):
        from_hf_state_dict(cfg, mixing)


def test_init_from_names_each_differing_model_key(tmp_path):
    model = tiny_model([0, 4, 16, 4])
    to_hf(model, tmp_path / "hf")
    other = ModelConfig(**dict(TINY, compress_ratios=[0, 4, 8, 4], sliding_window=16))
    with pytest.raises(ConfigError, match=r"train.init_from=.*its model config differs from this run's: "
                                          r"model.sliding_window: 8 there, 16 here; "
                                          r"model.compress_ratios: \[0, 4, 16, 4\] there, \[0, 4, 8, 4\] here\. "
                                          r"Set those model keys to match"):
        initial_weights(tmp_path / "hf", other)
    assert set(initial_weights(tmp_path / "hf", model.config)) == set(model.state_dict())


def test_init_from_an_hf_export_starts_a_new_run_with_the_sources_logits(trained_run, hf_export, tmp_path):
    """Export, then train.init_from the export: a new run at step 0 whose weights are the source's. Its one step
    runs at lr 1e-30 (within warm-up: 3e-32), which moves no fp32 weight, so its checkpoint holds the weights its
    first step's logits came from."""
    exported, _ = hf_export
    new_run = tmp_path / "new"
    res = run([sys.executable, "train.py", "train.seq_len=64", "train.micro_batch_size=2", "train.steps=1",
               "train.lr=1e-30", "train.phases.dense_steps=0", "train.phases.indexer_warmup_steps=0",
               "train.eval_batches=1", "logging.wandb.enabled=false", f"train.output_dir={new_run}",
               f"train.init_from={exported}"])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"initialised from train.init_from={exported} (step 0, fresh optimizer, LR and data)" in res.stdout
    assert "steps 0->1" in res.stdout
    source, started = load_model(trained_run), load_model(new_run)
    ids = torch.randint(0, 4000, (2, 70), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert relative_error(source.model(ids), started.model(ids)) <= 1e-7


@pytest.mark.slow
def test_lm_eval_hf_scores_the_export_as_dsv4_does(trained_run, hf_export, tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR` on a local multiple-choice task: its loglikelihoods equal the
    source run's own (the ones `--model dsv4` gives: tests/test_evaluate.py). The prompts are shorter than the
    model's top-k reach (index_topk 16 entries = 64 tokens), so no indexer tie can arise."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")  # lm_eval's hf backend imports it
    rows = [{"question": "It was the best of times, it was the", "choices": [" worst", " best", " end"], "gold": 0},
            {"question": "Call me", "choices": [" Ishmael", " later", " now"], "gold": 0}]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy_choice.yaml").write_text(TASK_YAML.format(
        name="toy_choice", data=data, output_type="multiple_choice",
        extra='doc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\ntarget_delimiter: ""\n'
              'metric_list:\n  - metric: acc'))
    out = tmp_path / "results"
    res = subprocess.run([str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
                          f"pretrained={hf_export[0]},dtype=float32", "--device", "cpu", "--tasks", "toy_choice",
                          "--include_path", str(tasks), "--output_path", str(out), "--log_samples"],
                         cwd=ROOT, env=dict(env(1), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    samples = [json.loads(line) for line in next(out.rglob("samples_*.jsonl")).read_text().splitlines()]
    assert len(samples) == len(rows)
    loaded = load_model(trained_run)
    tok, model = loaded.tokenizer, loaded.model
    for sample in samples:
        row = rows[sample["doc_id"]]
        context = tok.encode(row["question"]).ids
        ours = []
        for choice in row["choices"]:
            cont = tok.encode(row["question"] + choice).ids[len(context):]
            with torch.no_grad():
                logits = model(torch.tensor([context + cont[:-1]]))[0, -len(cont):]
            ours.append(float(torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum()))
        assert [float(r[0][0]) for r in sample["resps"]] == pytest.approx(ours, abs=1e-4)


def test_init_from_reads_another_runs_checkpoint(trained_run):
    """train.init_from also takes a run (its latest checkpoint, ZeRO shards merged): the weights load_model reads."""
    source = load_model(trained_run)
    state = initial_weights(trained_run, source.config)
    assert all(torch.equal(state[name], tensor) for name, tensor in source.model.state_dict().items())
    with pytest.raises(ConfigError, match=r"model.index_topk: 16 there, 8 here\. Set those model keys to match"):
        initial_weights(trained_run, ModelConfig(**{**source.config.to_dict(), "index_topk": 8}))
