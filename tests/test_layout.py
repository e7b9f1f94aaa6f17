"""The house rules of the layout (README "Layout"), checked over the import graph of dsv4/ and data_pipelines/.

Every import is read from the source (those inside functions too), so a loop or an upward import hidden in a
function body fails here as well.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dsv4", "data_pipelines")
# Third-party modules a function may import late: heavy (seconds to import) or optional, needed by one path only.
LATE_IMPORTS_ALLOWED = {"deepspeed", "wandb", "lm_eval", "transformers", "matplotlib", "triton", "datasets",
                        "pyarrow", "hydra", "omegaconf", "requests", "submitit", "hydra_plugins"}
# Project modules and torch, imported late on purpose, and why.
LATE_TARGETS_ALLOWED = {
    "dsv4.ops.indexer.triton_op": "imports triton: only the Triton backend loads it",
    "dsv4.ops.v4_attention.triton_op": "imports triton: only the Triton backend loads it",
    "torch": "the sweep driver and the build-lock path lookup run before (or without) torch, which takes seconds",
}
# Modules that may import anything late, and why.
LATE_IMPORTERS_ALLOWED = {
    "dsv4.training.sweep": "`train.py -m` starts the driver before any job: the config stack loads only to check jobs",
}
# What the model and its kernels are: they import nothing that loads, trains, decodes or evaluates.
MODEL = ("dsv4.model", "dsv4.attention", "dsv4.compressor", "dsv4.layers", "dsv4.rope", "dsv4.config",
         "dsv4.layer_kinds", "dsv4.ops", "dsv4.parallel")
ABOVE_MODEL = ("dsv4.training", "dsv4.inference", "dsv4.evaluation", "dsv4.evaluate", "dsv4.loading",
               "dsv4.export", "dsv4.generate", "dsv4.run_files", "dsv4.run_config")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The project module an imported name lives in (a.b.c -> a.b when c is a name in module a.b)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


@cache
def _imports(module: str) -> list[tuple[str, str | None, bool, int]]:
    """(imported module, imported name or None, inside a function?, line) for every import of a module."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    in_function = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(fn)}
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and ast.unparse(block.test).endswith("TYPE_CHECKING") for node in ast.walk(block)}
    out: list[tuple[str, str | None, bool, int]] = []
    for node in ast.walk(tree):
        if id(node) in type_only:  # annotations only: never imported at run time
            continue
        late = id(node) in in_function
        if isinstance(node, ast.Import):
            out += [(alias.name, None, late, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.append((full if full in MODULES else base, alias.name, late, node.lineno))
    return out


@cache
def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _, _, _ in _imports(module):
            owner = _owner(target)
            if owner and owner != module and not module.startswith(owner + "."):
                graph[module].add(owner)
    return graph


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_no_import_loop():
    graph, state, loops = _graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                loops.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not loops, f"import loops: {loops}"


@pytest.mark.parametrize("lower, upper", [
    (("data_pipelines",), ("dsv4",)),  # data knows no model
    (tuple(p for p in MODULES if p.startswith("dsv4.") and not _within(p, ("dsv4.training",))), ("dsv4.training",)),
    (MODEL, ABOVE_MODEL),  # the model knows no loader, trainer, cache or evaluation
    (("dsv4.inference", "dsv4.evaluation", "dsv4.loading", "dsv4.export"), ("dsv4.training",)),
], ids=["data-below-dsv4", "nothing-imports-training", "model-below-the-rest", "readers-below-training"])
def test_imports_point_down(lower, upper):
    upward = [f"{m} -> {t}" for m in MODULES if _within(m, lower) for t in _graph()[m] if _within(t, upper)]
    assert not upward, f"upward imports: {upward}"


def test_attention_imports_no_collectives():
    names = {target for target, _, _, _ in _imports("dsv4.attention")}
    forbidden = ("torch.distributed", "deepspeed", "dsv4.parallel.collectives", "dsv4.parallel.sequence",
                 "dsv4.parallel.ulysses")
    assert not [n for n in names if _within(n, forbidden)]


def test_no_private_names_across_modules():
    crossing = [f"{m}:{line} imports {name} from {target}" for m in MODULES
                for target, name, _, line in _imports(m)
                if name and name.startswith("_") and not name.startswith("__") and _owner(target) not in (None, m)]
    assert not crossing, crossing


def test_imports_at_the_top():
    late = [f"{m}:{line} {target}" for m in MODULES for target, _, inside, line in _imports(m)
            if inside and target.split(".")[0] not in LATE_IMPORTS_ALLOWED | set(LATE_TARGETS_ALLOWED)
            and target not in LATE_TARGETS_ALLOWED and m not in LATE_IMPORTERS_ALLOWED]
    assert not late, f"imports inside functions (move them to the top, or allow a heavy optional one): {late}"


def test_run_file_names_have_one_home():
    """The names of what a run leaves on disk are spelled in dsv4/run_files.py only; everything else imports them
    (so there is one resolver and one reader per file, not a copy that drifts)."""
    import dsv4.run_files as run_files

    names = {value for key, value in vars(run_files).items() if key.isupper() and isinstance(value, str)
             and ("." in value or "*" in value or value in (run_files.LATEST, run_files.CHECKPOINTS))}
    spelled = [f"{m}:{node.lineno} {node.value!r}" for m, path in MODULES.items()
               if m.startswith("dsv4.") and m != "dsv4.run_files"
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names]
    assert names and not spelled, spelled
