"""Our model as Hugging Face transformers' own DeepseekV4ForCausalLM (model_type `deepseek_v4`), and back.

transformers' DeepSeek-V4 decoder always has mHC hyper-connections and MoE MLPs; our plain decoder is the special
case where both do nothing (checked to about 1e-6 relative in fp32, tests/test_hf.py):
- hyper-connections: `hc_mult=1`, `hc_eps=0`, every block's `fn = 0`, `base = [100, 0, 0]`, `scale = 1`, so
  pre = sigmoid(100) = 1.0 in fp32, post = 2 * sigmoid(0) = 1 and comb = 1; the head's likewise (`hc_base = [100]`);
- MLP: one shared expert (our SwiGLU) plus one routed expert and router that are all zero (the routed expert adds
  exactly 0), every layer `moe` (no hash routing), `swiglu_limit` large enough never to clamp;
- attention: `layer_types` and `compress_rates` written out (HF has one ratio per kind), `partial_rotary_factor =
  qk_rope_head_dim / head_dim`, YaRN copied into `rope_parameters`, no MTP layers.
A model whose CSA layers were trained only to the dense or indexer-warm-up phase attends to every visible entry:
its HF `index_topk` covers every entry a sequence of `max_position_embeddings` tokens can have.
This module is plain dicts and tensors (no transformers import): dsv4.export writes through it, dsv4.loading and
the trainer's `train.init_from` read HF directories through it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dsv4.config import ConfigError, ModelConfig
from dsv4.run_files import CONFIG, GENERATION_CONFIG, SPECIAL_TOKENS_MAP, TOKENIZER, TOKENIZER_CONFIG, WEIGHTS

MODEL_TYPE = "deepseek_v4"
ARCHITECTURE = "DeepseekV4ForCausalLM"
LAYER_TYPES = {"window": "sliding_attention", "csa": "compressed_sparse_attention",
               "hca": "heavily_compressed_attention"}
HC_PASS_THROUGH = 100.0  # sigmoid(100) == 1.0 in fp32: the hyper-connection passes its one stream through whole
SWIGLU_NO_LIMIT = 1.0e30  # HF clamps the SwiGLU inputs at swiglu_limit (10 by default); ours never clamps
OURS_KEY = "dsv4"  # our config keys HF has no field for (index_topk of a dense-phase export, the phase)

# our parameter name (after "layers.{i}.") -> HF's (after "model.layers.{i}.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.attn_sink": "self_attn.sinks",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "ffn.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "head.weight": "lm_head.weight"}


def hf_refusals(cfg: ModelConfig) -> list[str]:
    """Why HF's DeepseekV4 cannot express this model (one line per reason, naming the layer or key); [] if it can."""
    reasons = []
    hca_ratio_at: dict[int, int] = {}
    for i, ratio in enumerate(cfg.compress_ratios):
        kind = cfg.layer_kind(i)
        if kind == "dense":
            reasons.append(f"compress_ratios[{i}]={ratio}: a dense GQA layer; HF's DeepseekV4 has only window, "
                           "CSA and HCA layers")
        elif kind == "hca":
            hca_ratio_at.setdefault(ratio, i)
    if len(hca_ratio_at) > 1:
        (first, i), (second, j) = sorted(hca_ratio_at.items(), key=lambda item: item[1])[:2]
        reasons.append(f"compress_ratios[{j}]={second}: HCA ratio differs from compress_ratios[{i}]={first}; HF's "
                       "DeepseekV4 has one ratio for all HCA layers (compress_rates)")
    if int(cfg.head_dim * (cfg.qk_rope_head_dim / cfg.head_dim)) != cfg.qk_rope_head_dim:
        reasons.append(f"qk_rope_head_dim={cfg.qk_rope_head_dim}: HF recomputes it as int(head_dim * "
                       f"partial_rotary_factor), which rounds it to another value for head_dim={cfg.head_dim}")
    return reasons


def check_hf_expressible(cfg: ModelConfig) -> None:
    """ConfigError listing every reason this model cannot be written in HF's DeepseekV4 format."""
    reasons = hf_refusals(cfg)
    if reasons:
        raise ConfigError("--format hf: HF's DeepseekV4ForCausalLM cannot express this model: " + "; ".join(reasons)
                          + ". Export it with --format dsv4 instead")


def hf_config(cfg: ModelConfig, eos_id: int, phase: str = "sparse", bos_id: int | None = None) -> dict[str, Any]:
    """HF's config.json for our model: every field that changes the computation is written out."""
    check_hf_expressible(cfg)
    ratios = {LAYER_TYPES[cfg.layer_kind(i)]: r for i, r in enumerate(cfg.compress_ratios) if r > 0}
    compress_rates = {"compressed_sparse_attention": ratios.get("compressed_sparse_attention", 4),
                      "heavily_compressed_attention": ratios.get("heavily_compressed_attention", 128)}
    index_topk = cfg.index_topk
    if phase != "sparse":  # attend to every visible entry, as the CSA layers were trained to
        index_topk = max(index_topk, math.ceil(cfg.max_position_embeddings / compress_rates[LAYER_TYPES["csa"]]))
    factor = cfg.qk_rope_head_dim / cfg.head_dim
    compress_rope: dict[str, Any] = {"rope_type": "default"}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        compress_rope = {"rope_type": "yarn", "factor": rs.factor, "beta_fast": rs.beta_fast,
                         "beta_slow": rs.beta_slow,
                         "original_max_position_embeddings": rs.original_max_position_embeddings,
                         "attention_factor": 1.0}  # no YaRN temperature (HF would derive 0.1 ln(factor) + 1)
    n = cfg.num_hidden_layers
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "dtype": "float32",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": n,
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": 1,
        "head_dim": cfg.head_dim,
        "partial_rotary_factor": factor,
        "q_lora_rank": cfg.q_lora_rank,
        "o_groups": cfg.o_groups,
        "o_lora_rank": cfg.o_lora_rank,
        "sliding_window": cfg.sliding_window,
        "layer_types": [LAYER_TYPES[cfg.layer_kind(i)] for i in range(n)],
        "compress_rates": compress_rates,
        "index_n_heads": cfg.index_n_heads,
        "index_head_dim": cfg.index_head_dim,
        "index_topk": index_topk,
        "rope_theta": cfg.rope_theta,
        "compress_rope_theta": cfg.compress_rope_theta,
        "rope_parameters": {
            "main": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": factor},
            "compress": {**compress_rope, "rope_theta": cfg.compress_rope_theta, "partial_rotary_factor": factor},
        },
        # the plain form: one residual stream, one shared expert (our SwiGLU), a zero routed expert
        "hc_mult": 1,
        "hc_eps": 0.0,
        "hc_sinkhorn_iters": 1,
        "moe_intermediate_size": cfg.intermediate_size,
        "n_routed_experts": 1,
        "num_experts_per_tok": 1,
        "n_shared_experts": 1,
        "mlp_layer_types": ["moe"] * n,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": True,
        "scoring_func": "sqrtsoftplus",
        "swiglu_limit": SWIGLU_NO_LIMIT,
        "hidden_act": "silu",
        "num_nextn_predict_layers": 0,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        OURS_KEY: {"index_topk": cfg.index_topk, "attention_phase": phase},
    }


def generation_config(eos_id: int, bos_id: int | None = None) -> dict[str, Any]:
    """generation_config.json: greedy, stopping at the run tokenizer's EOS (HF's default EOS id 1 is another token)."""
    return {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": False}


def to_hf_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF's names, plus the pass-through hyper-connections and the zero router and routed expert."""
    check_hf_expressible(cfg)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = tensor
            continue
        layer, rest = _split_layer(name)
        if layer is None or rest not in _LAYER_NAMES:
            raise ConfigError(f"{name}: no HF DeepseekV4 parameter for it")
        out[f"model.layers.{layer}.{_LAYER_NAMES[rest]}"] = tensor
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)  # HF ties it to the embedding itself
    d, inter, dtype = cfg.hidden_size, cfg.intermediate_size, torch.float32
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for hc in ("attn_hc", "ffn_hc"):
            out[prefix + f"{hc}.fn"] = torch.zeros(3, d, dtype=dtype)
            out[prefix + f"{hc}.base"] = torch.tensor([HC_PASS_THROUGH, 0.0, 0.0], dtype=dtype)
            out[prefix + f"{hc}.scale"] = torch.ones(3, dtype=dtype)
        out[prefix + "mlp.gate.weight"] = torch.zeros(1, d, dtype=dtype)
        out[prefix + "mlp.gate.e_score_correction_bias"] = torch.zeros(1, dtype=dtype)
        out[prefix + "mlp.experts.gate_up_proj"] = torch.zeros(1, 2 * inter, d, dtype=dtype)
        out[prefix + "mlp.experts.down_proj"] = torch.zeros(1, d, inter, dtype=dtype)
    out["model.hc_head.hc_fn"] = torch.zeros(1, d, dtype=dtype)
    out["model.hc_head.hc_base"] = torch.tensor([HC_PASS_THROUGH], dtype=dtype)
    out["model.hc_head.hc_scale"] = torch.ones(1, dtype=dtype)
    return {name: t.contiguous() for name, t in out.items()}


def write_hf_directory(out: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], tokenizer: Any, eos_id: int,
                       phase: str = "sparse", source: str = "") -> None:
    """Write what AutoModelForCausalLM / AutoTokenizer.from_pretrained(out) read: config.json, model.safetensors
    (HF's names), generation_config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json.
    tokenizer: a `tokenizers.Tokenizer`; eos_id: its end-of-text id; phase: the CSA phase the weights run in."""
    config = hf_config(cfg, eos_id, phase)  # refuses before anything is written
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(cfg, state), str(out / WEIGHTS), metadata={"format": "pt", "source": source})
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    (out / GENERATION_CONFIG).write_text(json.dumps(generation_config(eos_id), indent=2))
    tokenizer.save(str(out / TOKENIZER))
    eos = tokenizer.id_to_token(eos_id)
    # PreTrainedTokenizerFast reads tokenizer.json as it is; pad = EOS so batched scoring (lm_eval) can pad
    (out / TOKENIZER_CONFIG).write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos,
        "model_max_length": cfg.max_position_embeddings, "clean_up_tokenization_spaces": False}, indent=2))
    (out / SPECIAL_TOKENS_MAP).write_text(json.dumps({"eos_token": eos, "pad_token": eos}, indent=2))


def _split_layer(name: str) -> tuple[int | None, str]:
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None, name


# ---------------------------------------------------------------- reading an HF deepseek_v4 directory
_HF_LAYER_NAMES = {hf: ours for ours, hf in _LAYER_NAMES.items()}
_HF_TOP_NAMES = {hf: ours for ours, hf in _TOP_NAMES.items()}
_KIND_OF_LAYER_TYPE = {hf: ours for ours, hf in LAYER_TYPES.items()}
_ROUTED = ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj")
NOT_TRAINED_HERE = "this project does not train it yet; only the plain form dsv4.export --format hf writes is read"


def is_hf_config(config: dict[str, Any]) -> bool:
    """A config.json written for transformers' DeepseekV4 (ours has no model_type)."""
    return config.get("model_type") == MODEL_TYPE


def from_hf_config(config: dict[str, Any], label: str = CONFIG) -> ModelConfig:
    """Our ModelConfig for an HF deepseek_v4 config.json of the plain form; ConfigError naming any feature this
    project does not train (more hyper-connection streams, routed experts, hash routing, MTP layers)."""
    def refuse(what: str) -> ConfigError:
        return ConfigError(f"{label}: {what}; {NOT_TRAINED_HERE}")

    if not is_hf_config(config):
        raise ConfigError(f"{label}: model_type={config.get('model_type')!r}, not {MODEL_TYPE!r}")
    n = config["num_hidden_layers"]
    if config.get("hc_mult", 4) != 1:
        raise refuse(f"hc_mult={config.get('hc_mult', 4)}: mHC hyper-connections over several residual streams")
    mlp_types = config.get("mlp_layer_types") or ["hash_moe"] * min(n, 3) + ["moe"] * max(0, n - 3)
    if "hash_moe" in mlp_types:
        raise refuse(f"mlp_layer_types[{mlp_types.index('hash_moe')}]=hash_moe: hash-routed MoE")
    if config.get("n_routed_experts", 256) != 1 or config.get("num_experts_per_tok", 6) != 1:
        raise refuse(f"n_routed_experts={config.get('n_routed_experts', 256)}: routed MoE experts")
    if config.get("n_shared_experts", 1) != 1:
        raise refuse(f"n_shared_experts={config['n_shared_experts']}: more than one shared expert")
    if config.get("num_nextn_predict_layers", 1) != 0:
        raise refuse(f"num_nextn_predict_layers={config.get('num_nextn_predict_layers', 1)}: MTP layers")
    if config.get("swiglu_limit", 10.0) < SWIGLU_NO_LIMIT:
        raise refuse(f"swiglu_limit={config.get('swiglu_limit', 10.0)}: a clamped SwiGLU")
    rates = config.get("compress_rates") or {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    if "compressed_sparse_attention" in config["layer_types"] and rates["compressed_sparse_attention"] != 4:
        raise refuse(f"compress_rates.compressed_sparse_attention={rates['compressed_sparse_attention']}: CSA "
                     "groups of another size than 4")
    ratios = [0 if t == "sliding_attention" else rates[t] for t in config["layer_types"]]
    compress = config["rope_parameters"]["compress"]
    rope_scaling = None
    if compress.get("rope_type") == "yarn":
        if compress.get("attention_factor", 1.0) != 1.0:
            raise refuse(f"rope_parameters.compress.attention_factor={compress['attention_factor']}: a YaRN "
                         "attention temperature")
        rope_scaling = {"factor": compress["factor"], "beta_fast": compress.get("beta_fast", 32.0),
                        "beta_slow": compress.get("beta_slow", 1.0),
                        "original_max_position_embeddings": compress["original_max_position_embeddings"]}
    head_dim = config["head_dim"]
    ours = config.get(OURS_KEY) or {}
    return ModelConfig.from_dict({
        "vocab_size": config["vocab_size"], "hidden_size": config["hidden_size"], "num_hidden_layers": n,
        "intermediate_size": config["moe_intermediate_size"], "rms_norm_eps": config["rms_norm_eps"],
        "initializer_range": config.get("initializer_range", 0.02),
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
        "max_position_embeddings": config["max_position_embeddings"],
        "num_attention_heads": config["num_attention_heads"], "head_dim": head_dim,
        "qk_rope_head_dim": int(head_dim * config["partial_rotary_factor"]), "q_lora_rank": config["q_lora_rank"],
        "o_groups": config["o_groups"], "o_lora_rank": config["o_lora_rank"],
        "sliding_window": config["sliding_window"], "compress_ratios": ratios,
        "index_n_heads": config["index_n_heads"], "index_head_dim": config["index_head_dim"],
        "index_topk": ours.get("index_topk", config["index_topk"]),
        "rope_theta": config["rope_parameters"]["main"]["rope_theta"],
        "compress_rope_theta": compress["rope_theta"], "rope_scaling": rope_scaling,
    }, prefix=label)


def from_hf_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], label: str = WEIGHTS
                       ) -> dict[str, torch.Tensor]:
    """HF's weights -> ours; the pass-through hyper-connections and the zero router and routed expert are checked
    and dropped (ConfigError naming the first that holds anything else: MTP weights, trained hyper-connections or
    routed experts are features this project does not train)."""
    mtp = sorted(name for name in state if name.startswith("mtp.") or ".mtp." in name)
    if mtp:
        raise ConfigError(f"{label}: {mtp[0]}: MTP weights; {NOT_TRAINED_HERE}")
    expected = to_hf_state_dict(cfg, {})  # the synthesised parameters, as the plain form holds them
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in expected:
            if tuple(tensor.shape) != tuple(expected[name].shape) or not torch.equal(tensor.float(), expected[name]):
                feature = "routed MoE experts" if any(name.endswith(r) for r in _ROUTED) else (
                    "a router score bias" if "e_score_correction_bias" in name else "trained mHC hyper-connections")
                raise ConfigError(f"{label}: {name} is not the plain form's: {feature}; {NOT_TRAINED_HERE}")
            continue
        if name in _HF_TOP_NAMES:
            out[_HF_TOP_NAMES[name]] = tensor
            continue
        parts = name.split(".", 3)
        if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _HF_LAYER_NAMES:
            out[f"layers.{parts[2]}.{_HF_LAYER_NAMES[parts[3]]}"] = tensor
            continue
        raise ConfigError(f"{label}: {name}: no parameter of this project's model for it")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ConfigError(f"{label}: lacks {missing[0]} ({len(missing)} of the plain form's parameters missing)")
    if cfg.tie_word_embeddings and "head.weight" not in out and "embed.weight" in out:
        out["head.weight"] = out["embed.weight"]
    return out
