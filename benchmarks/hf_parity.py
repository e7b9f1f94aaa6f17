"""Where transformers' DeepseekV4ForCausalLM and our model differ beyond fp32 rounding, on one exported model.

    python benchmarks/hf_parity.py                                   # the tiny preset, random weights, CPU
    python benchmarks/hf_parity.py --length 1024 --positions 8192 65536 1048576 --repeats 5

The model is the tiny preset (conf/model/tiny.yaml: window, CSA, HCA-32, CSA) with random weights whose norms,
slot biases and sinks are perturbed, written with dsv4.hf.write_hf_directory and loaded by
AutoModelForCausalLM.from_pretrained. Errors are max |ours - theirs| / max |ours| over every logit.
1. top-k ties (fp32): HF as it is, and HF with exact indexer ties broken toward the most recent entry as ours
   (a hook adding index * 1e-30 to its scores): the rows that differ come from the ties alone.
2. bf16: both models cast to bf16 (HF keeps hyper-connection, norm, sink, slot-bias and router parameters in fp32),
   each against our fp32 logits, and against each other.
3. long positions: HF computes RoPE angles in fp32 (position * inverse frequency), ours in fp64: the largest cos /
   sin difference at each position, for window layers (rope_theta) and compressed layers (compress_rope_theta +
   YaRN); then a window-only model's logits at those positions (HF position_ids, our start_pos).
4. speed (this machine, fp32, no grad): a forward of --length tokens and greedy decoding of --decode tokens after
   a --prompt-token prompt, ours (PyTorch path; dsv4.generate's KV cache) against HF eager (its own cache); the
   ratio is HF time / ours. Set OMP_NUM_THREADS for the threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_modeling

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_pipelines.tokenizer import TokenizerSpec, eos_id_of, load_tokenizer  # noqa: E402
from dsv4 import build_model  # noqa: E402
from dsv4.config import ModelConfig  # noqa: E402
from dsv4.hf import write_hf_directory  # noqa: E402
from dsv4.inference.generate import generate_ids  # noqa: E402
from dsv4.rope import Rotary  # noqa: E402


def random_model(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg, backend="torch").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 or name.endswith("ape"):
                param.add_(0.2 * torch.randn_like(param))
    return model


def to_hf(model, out: Path, dtype: torch.dtype = torch.float32, eos_id: int | None = None):
    spec = TokenizerSpec(None, None)
    tokenizer = load_tokenizer(spec)
    eos = eos_id_of(tokenizer, spec) if eos_id is None else eos_id
    if not (out / "config.json").is_file():
        write_hf_directory(out, model.config, model.state_dict(), tokenizer, eos)
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()


def break_ties_as_ours(hf_model) -> None:
    def most_recent_first(module, args, scores):
        return scores + torch.arange(scores.shape[-1], dtype=scores.dtype) * 1e-30

    for module in hf_model.modules():
        if isinstance(module, hf_modeling.DeepseekV4IndexerScorer):
            module.register_forward_hook(most_recent_first)


def rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.float() - theirs.float()).abs().max() / ours.float().abs().max())


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence (sections 1, 2, 4)")
    parser.add_argument("--positions", type=int, nargs="+", default=[8192, 65536, 1048576])
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens before greedy decoding")
    parser.add_argument("--decode", type=int, default=32, help="greedy tokens decoded (section 4)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    for flag in ("length", "prompt", "decode", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}={getattr(args, flag)}: must be >= 1")
    if args.prompt > args.length:
        parser.error(f"--prompt={args.prompt}: longer than --length {args.length} (the prompt is cut from that "
                     "sequence); give at most --length")
    if min(args.positions) < 0:
        parser.error(f"--positions={min(args.positions)}: must be >= 0")
    torch.set_grad_enabled(False)
    cfg = ModelConfig()  # the tiny preset
    ids = torch.randint(0, cfg.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(1))
    model = random_model(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "hf"
        reference = model(ids)

        print(f"1. top-k ties, fp32, tiny preset, {args.length} tokens (index_topk {cfg.index_topk})")
        hf = to_hf(model, out)
        as_is = hf(ids).logits
        row_err = ((reference - as_is).abs().amax(-1) / reference.abs().max())[0]
        break_ties_as_ours(hf)
        tied = hf(ids).logits
        print(f"   HF as it is          max rel err {rel(reference, as_is):.2e}; rows above 1e-5: "
              f"{int((row_err > 1e-5).sum())} of {args.length}")
        print(f"   HF, ties as ours     max rel err {rel(reference, tied):.2e}")

        print("2. bf16 (the same weights cast), against our fp32 logits")
        ours_bf16 = random_model(cfg).to(torch.bfloat16)(ids)
        hf_bf16 = to_hf(model, out, torch.bfloat16)
        break_ties_as_ours(hf_bf16)
        theirs_bf16 = hf_bf16(ids).logits
        print(f"   ours bf16            max rel err {rel(reference, ours_bf16):.2e}")
        print(f"   HF bf16              max rel err {rel(reference, theirs_bf16):.2e}")
        print(f"   ours bf16 vs HF bf16 max rel err {rel(ours_bf16, theirs_bf16):.2e}")

        print("3. long positions: RoPE cos/sin, HF (fp32 angles) against ours (fp64 angles)")
        kinds = {"main": Rotary(cfg.qk_rope_head_dim, cfg.rope_theta, None),
                 "compress": Rotary(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.rope_scaling)}
        window_cfg = ModelConfig(compress_ratios=[0, 0], num_hidden_layers=2)
        window_model = random_model(window_cfg)
        window_hf = to_hf(window_model, Path(tmp) / "hf_window")
        short = ids[:, :64]
        print(f"   {'position':>9} | {'window cos/sin':>14} | {'compressed cos/sin':>18} | window-only model logits")
        for position in [0, *args.positions]:
            errors = []
            for kind, rotary in kinds.items():
                cos, sin = rotary.cos_sin(torch.tensor([position]))
                hf_cos, hf_sin = hf.model.rotary_emb(reference, torch.tensor([[position]]), layer_type=kind)
                errors.append(max(float((cos - hf_cos[0]).abs().max()), float((sin - hf_sin[0]).abs().max())))
            positions = torch.arange(position, position + short.shape[1])[None]
            logits_err = rel(window_model(short, start_pos=position), window_hf(short, position_ids=positions).logits)
            print(f"   {position:>9} | {errors[0]:>14.2e} | {errors[1]:>18.2e} | {logits_err:.2e}")

        print(f"4. speed, fp32, CPU ({torch.get_num_threads()} threads), median of {args.repeats}")
        forward_ours = timed(lambda: model(ids), args.repeats)
        forward_hf = timed(lambda: hf(ids), args.repeats)
        print(f"   forward {args.length} tokens     ours {forward_ours * 1e3:8.1f} ms | HF eager "
              f"{forward_hf * 1e3:8.1f} ms | HF / ours {forward_hf / forward_ours:.2f}x")
        prompt = ids[:, :args.prompt]
        decode_hf = to_hf(model, out)  # no EOS stop: both decode --decode tokens
        decode_hf.generation_config.eos_token_id = None
        decode_ours = timed(lambda: generate_ids(model, prompt.tolist(), max_new_tokens=args.decode), args.repeats)
        decode_theirs = timed(lambda: decode_hf.generate(prompt, max_new_tokens=args.decode, do_sample=False),
                              args.repeats)
        print(f"   prefill {args.prompt} + decode {args.decode}  ours {decode_ours * 1e3:8.1f} ms | HF eager "
              f"{decode_theirs * 1e3:8.1f} ms | HF / ours {decode_theirs / decode_ours:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
