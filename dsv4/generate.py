"""Generate text from a trained model with the compressed KV cache.

    python -m dsv4.generate outputs/exp1 --prompt "It was a dark and stormy night" --max-new-tokens 100
    python -m dsv4.generate exported/exp1 --prompt "..." --temperature 0.8 --top-p 0.95 --seed 0 --cache-dtype fp8

PATH is a run directory, its checkpoints/ directory, one stepNNNNNNN/ checkpoint or a `python -m dsv4.export`
directory (dsv4.loading.load_model); the model's own tokenizer is used. The text streams to stdout as it is
generated; a closing line (stderr) gives the prompt tokens, prefill and decode tokens/s, and the bytes the cache
holds next to what a dense GQA cache of the same model would hold. Greedy when --temperature is 0 (default);
--top-k and --top-p then have no effect (a warning on stderr says so).
"""

from __future__ import annotations

import argparse
import sys

import torch

from dsv4.config import ConfigError
from dsv4.inference.generate import PREFILL_CHUNK, check_device, check_sampling, generate
from dsv4.inference.storage import CACHE_DTYPES
from dsv4.loading import load_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dsv4.generate", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="run dir, checkpoints/ dir, stepNNNNNNN/ dir or export dir")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--cache-dtype", default="model", choices=CACHE_DTYPES,
                        help="model: the model's dtype; fp8: the release's layout (fp8 + scales, bf16 RoPE)")
    parser.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, help="prompt tokens per prefill step")
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda[:N]")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="auto: bf16 on CUDA, else fp32")
    parser.add_argument("--no-stop", action="store_true", help="keep generating past the end-of-text token")
    return parser.parse_args(argv)


class Streamer:
    """Prints the decoded text as tokens arrive; holds back an incomplete UTF-8 character."""

    def __init__(self, tokenizer, out=None) -> None:
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, step_tokens: list[int | None]) -> None:
        if step_tokens[0] is None:
            return
        self.tokens.append(step_tokens[0])
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def closing_line(stats) -> str:
    held, dense = stats.cache_bytes["total"], stats.dense_cache_bytes
    share = f", {100 * held / dense:.1f}%" if dense else ""
    return (f"prompt {stats.prompt_tokens[0]} tokens | prefill {stats.prefill_tokens_per_s:,.0f} tokens/s | "
            f"decode {stats.decode_tokens_per_s:,.1f} tokens/s ({stats.new_tokens} tokens) | cache {_mib(held)} "
            f"(a dense GQA cache of this model: {_mib(dense)}{share})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not args.prompt:
            raise ConfigError("--prompt: empty; give the text to continue")
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        if args.prefill_chunk < 1:
            raise ConfigError(f"--prefill-chunk={args.prefill_chunk}: must be >= 1")
        device = check_device(args.device)
        if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
            flags = "/".join(f for f, v in (("--top-k", args.top_k), ("--top-p", args.top_p)) if v is not None)
            verb = "have" if "/" in flags else "has"
            print(f"warning: {flags} {verb} no effect at --temperature 0 (greedy decoding); give --temperature > 0 "
                  "to sample", file=sys.stderr)
        dtype = DTYPES.get(args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
        loaded = load_model(args.path, device=device, dtype=dtype, key="PATH")
        n_prompt = len(loaded.tokenizer.encode(args.prompt).ids)
        limit = loaded.config.max_position_embeddings
        if n_prompt > limit:
            raise ConfigError(f"--prompt: {n_prompt} tokens exceed the model's max_position_embeddings ({limit})")
        print(args.prompt, end="", flush=True)
        result = generate(loaded.model, loaded.tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                          args.top_k, args.top_p, args.seed, args.cache_dtype, args.prefill_chunk,
                          eos_id=loaded.eos_id, stop_at_eos=not args.no_stop, on_step=Streamer(loaded.tokenizer))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(flush=True)
    print(closing_line(result.stats), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
