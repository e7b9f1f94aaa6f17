"""An lm-evaluation-harness model backend for dsv4 models (a plugin: nothing of lm-eval is forked or patched).

    python -m dsv4.evaluation.harness --model dsv4 --model_args path=outputs/exp1 --tasks hellaswag
    python -m dsv4.evaluation.harness --model dsv4 --model_args path=EXPORT_DIR,max_length=1024 \\
        --tasks my_task --include_path my_tasks/ --output_path results/ --log_samples

The command is lm-eval's own CLI (`lm_eval`, every option the same) with this module imported first, which
registers the model name `dsv4`: lm-eval 0.4 finds models only in its own table or in modules imported before its
CLI runs (it reads no plugin entry points). In Python, `import dsv4.evaluation.harness` and then
`lm_eval.simple_evaluate(model="dsv4", model_args="path=...")`.

model_args: path (a run, checkpoint or export directory, loaded by dsv4.loading.load_model), max_length (default:
the run's train.seq_len, else 2048; longer inputs keep their last tokens), device (cpu / cuda), dtype (float32 /
bfloat16), backend (the attention backend), phase (CSA phase; default sparse). On the command line the device is
lm-eval's own --device flag (it passes one to every model, default cuda:0; device= in --model_args is refused, naming
the flag); without a GPU the backend says so and runs on the CPU. Any other model_arg, or a bad value
(max_length=-1), is refused before the model is read: a ConfigError naming it (`python -m dsv4.evaluation.harness`:
one line, exit code 2).

Requests: loglikelihood (sum of the continuation's log-probabilities, and whether greedy decoding would produce it),
loglikelihood_rolling (the whole text in disjoint windows of max_length, each with as much preceding context as
fits) and generate_until (greedy decoding with the KV cache, through dsv4.evaluation.decoding.greedy_continue,
cut at the first stop string or EOS; sampling is not supported).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import lm_eval
import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dsv4.attention import PHASES
from dsv4.config import ConfigError
from dsv4.evaluation.decoding import greedy_continue
from dsv4.loading import load_model
from dsv4.ops.v4_attention import BACKENDS

DEFAULT_MAX_LENGTH = 2048
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
MODEL_ARGS = ("path", "max_length", "device", "dtype", "backend", "phase")
HARNESS_ARGS = ("batch_size", "max_batch_size")  # lm-eval passes these to every model; requests go one at a time


def check_model_args(max_length: Any, device: Any, dtype: Any, backend: Any, phase: Any, unknown: dict[str, Any]
                     ) -> int | None:
    """Refuse an unknown model_arg or a bad value, naming it, before anything is loaded; -> max_length as an int."""
    extra = sorted(set(unknown) - set(HARNESS_ARGS))
    if extra:
        raise ConfigError(f"--model_args {extra[0]}={unknown[extra[0]]}: unknown model_arg (choose from "
                          f"{', '.join(MODEL_ARGS)})")
    if max_length is not None:
        try:
            number = int(str(max_length))
        except ValueError:
            number = 0
        if isinstance(max_length, bool) or number < 1:
            raise ConfigError(f"--model_args max_length={max_length}: must be a whole number >= 1")
        max_length = number
    if str(dtype) not in DTYPES:
        raise ConfigError(f"--model_args dtype={dtype}: choose from {', '.join(DTYPES)}")
    if str(backend) not in BACKENDS:
        raise ConfigError(f"--model_args backend={backend}: choose from {', '.join(BACKENDS)}")
    if str(phase) not in PHASES:
        raise ConfigError(f"--model_args phase={phase}: choose from {', '.join(PHASES)}")
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConfigError(f"--model_args device={device}: choose cpu, cuda or cuda:N")
    return max_length


@register_model("dsv4")
class DSV4LM(LM):
    def __init__(self, path: str | None = None, max_length: int | None = None, device: str = "cpu",
                 dtype: str = "float32", backend: str = "auto", phase: str = "sparse", batch_size: Any = 1,
                 **unknown: Any) -> None:
        super().__init__()
        max_length = check_model_args(max_length, device, dtype, backend, phase, unknown)
        if path is None:
            raise ConfigError("--model_args: give path=RUN_DIR (a run, checkpoint or export directory)")
        if str(device).startswith("cuda") and not torch.cuda.is_available():  # lm-eval's default device is cuda
            print(f"dsv4 backend: device {device} is not available here; running on cpu", file=sys.stderr)
            device = "cpu"
        self.loaded = load_model(path, device=device, dtype=DTYPES[str(dtype)], backend=backend,
                                 key="--model_args path")
        self.loaded.model.set_attention_options(phase=phase)
        self.model, self.tokenizer, self.eos_id = self.loaded.model, self.loaded.tokenizer, self.loaded.eos_id
        self.device_name = device
        run_len = self.loaded.run_config.train.seq_len if self.loaded.run_config is not None else None
        self.max_length = int(max_length or run_len or DEFAULT_MAX_LENGTH)

    # ------------------------------------------------------------ tokens

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def context_and_continuation(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of both, split as the whole text tokenizes (trailing spaces of the context go with the
        continuation, as lm-eval's own backends do); an empty context becomes the EOS token."""
        if not context:
            return [self.eos_id], self.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_len = len(self.encode(context))
        return whole[:context_len], whole[context_len:]

    @torch.no_grad()
    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(sum of log p(continuation | context), whether every continuation token is the argmax), on the last
        max_length + 1 tokens."""
        ids = (context + continuation)[-(self.max_length + 1):]
        n = len(continuation)
        inputs = torch.tensor([ids[:-1]], dtype=torch.long, device=self.device_name)
        logprobs = F.log_softmax(self.model(inputs)[0, -n:].float(), dim=-1)  # [n, vocab]
        target = torch.tensor(ids[-n:], dtype=torch.long, device=self.device_name)
        return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())

    # ------------------------------------------------------------ the harness's three requests

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation = self.context_and_continuation(*request.args)
            results.append(self.score(context, continuation) if continuation else (0.0, True))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in requests:
            windows = map(make_disjoint_window, get_rolling_token_windows(
                self.encode(request.args[0]), prefix_token=self.eos_id, max_seq_len=self.max_length, context_len=1))
            results.append(sum(self.score(list(ctx), list(cont))[0] for ctx, cont in windows))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0) or 0) > 0:
                raise ConfigError("dsv4 backend: only greedy decoding (do_sample: false, temperature: 0)")
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            ids = (self.encode(context) or [self.eos_id])[-max(1, self.max_length - max_new):]
            out = greedy_continue(self.model, [ids], max_new, eos_id=self.eos_id)[0]
            if out and out[-1] == self.eos_id:
                out = out[:-1]
            text = self.tokenizer.decode(out)
            cuts = [text.index(stop) for stop in until if stop and stop in text]
            results.append(text[: min(cuts)] if cuts else text)
        return results


HUB_OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
TASK_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
TASK_FILES = (".yaml", ".yml", ".py")  # where lm-eval's tasks, groups and tags are named


def precheck(argv: list[str]) -> None:
    """What can be checked before lm-eval reads its task index (10-20 s): --tasks given, and for --model dsv4 its
    model_args (names, values, path present); a ConfigError naming the flag."""
    if not argv or argv[0] in ("ls", "validate") or {"-h", "--help"} & set(argv):
        return
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--tasks", "-t", nargs="+")
    p.add_argument("--model", "-M")
    p.add_argument("--model_args", "-a", nargs="+")
    p.add_argument("--config", "-C")
    p.add_argument("--include_path")
    known, _ = p.parse_known_args(argv[1:] if argv[0] == "run" else argv)
    if not known.tasks and not known.config:
        raise ConfigError("--tasks: give the tasks to evaluate, e.g. --tasks hellaswag (`lm-eval ls tasks` lists "
                          "them; a task of your own: --tasks NAME --include_path DIR)")
    missing = unknown_tasks(",".join(known.tasks or []).split(","), known.include_path)
    if missing:
        raise ConfigError(f"--tasks: Tasks not found: {', '.join(missing)} (`lm-eval ls tasks` lists them; a task "
                          "of your own: --include_path DIR)")
    if known.model != "dsv4" or known.model_args is None:
        return
    given: dict[str, str] = {}
    for part in ",".join(known.model_args).split(","):
        if part.strip():
            key, _, value = part.partition("=")
            given[key.strip()] = value.strip()
    if "device" in given:  # lm-eval's CLI always passes its --device (default cuda:0): both would reach the model
        raise ConfigError(f"--model_args device={given['device']}: give the device with lm-eval's own flag, "
                          f"--device {given['device'] or 'cpu'} (it passes one to every model)")
    known_args = {k: given.pop(k) for k in MODEL_ARGS if k in given}
    check_model_args(known_args.get("max_length"), known_args.get("device", "cpu"),
                     known_args.get("dtype", "float32"), known_args.get("backend", "auto"),
                     known_args.get("phase", "sparse"), given)
    path = known_args.get("path")
    if not path:
        raise ConfigError("--model_args: give path=RUN_DIR (a run, checkpoint or export directory)")
    if not Path(path).exists():
        raise ConfigError(f"--model_args path={path}: no such directory")


def unknown_tasks(names: list[str], include_path: str | None) -> list[str]:
    """The task names that no task file lm-eval would read mentions (its own tasks folder, --include_path): surely
    unknown, found in a second instead of after lm-eval's 20-40 s index. A pattern, a file or a name of other
    characters is left to lm-eval, and so is any name some file mentions (lm-eval decides)."""
    plain = [n.strip() for n in names if TASK_NAME.fullmatch(n.strip()) and not Path(n.strip()).exists()]
    if not plain:
        return []
    roots = [Path(lm_eval.__file__).parent / "tasks", *([Path(include_path)] if include_path else [])]
    left = set(plain)
    for root in roots:
        for path in (p for p in root.rglob("*") if p.suffix in TASK_FILES) if root.is_dir() else [root]:
            text = path.read_text(errors="ignore")
            left = {n for n in left if n not in text}
            if not left:
                return []
    return [n for n in plain if n in left]


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in HUB_OFFLINE)


def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__.strip() + "\n\nlm-eval's options follow (every one applies; give --model dsv4 and "
              "--model_args path=...,max_length=...,dtype=...,backend=...,phase=... and the device with --device).\n")
        if sys.argv[1:] in (["-h"], ["--help"]):
            sys.argv[1:1] = ["run"]  # `run`'s options (the ones this command takes), not lm-eval's command list
    try:
        precheck(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from lm_eval.__main__ import cli_evaluate  # lm_eval's CLI: heavy, imported only once the prechecks passed

    try:
        import requests
        connection_errors: tuple[type[BaseException], ...] = (ConnectionError, requests.exceptions.ConnectionError)
    except ImportError:
        connection_errors = (ConnectionError,)
    try:
        cli_evaluate()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except connection_errors as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if _offline():
            print("error: a task needs its dataset from the Hugging Face Hub, and the Hub is offline here "
                  "(HF_HUB_OFFLINE=1): set HF_HUB_OFFLINE=0 with network, or use a local task via --include_path "
                  f"DIR ({first})", file=sys.stderr)
        else:
            print(f"error: a task's dataset could not be fetched from the Hugging Face Hub ({first}); check the "
                  "network, or use a local task via --include_path DIR", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:
        text = str(e).strip()
        if text.startswith("Tasks not found") or text.startswith("Need to specify task"):
            print(f"error: --tasks: {text.splitlines()[0]} (`lm-eval ls tasks` lists them; a task of your own: "
                  "--include_path DIR)", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
