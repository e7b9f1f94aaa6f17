"""Every Triton kernel lowers to GPU code (sm_90 and sm_80) without a GPU: the interpreter tests check the
arithmetic, this checks what only a GPU compile sees (dot shapes, types, shared memory). Runs Triton's compiler
and ptxas from the triton wheel; nothing is launched."""

import os
import re
import subprocess
import sys

import pytest

import dsv4.ops.indexer.triton as indexer_kernels
import dsv4.ops.triton_common as common_kernels
import dsv4.ops.v4_attention.triton as attention_kernels


def kernel_names() -> set[str]:
    return {name for module in (attention_kernels, indexer_kernels, common_kernels) for name in vars(module)
            if name.startswith("_") and name.endswith("_kernel")}


@pytest.mark.parametrize("arch,dtypes", [(90, ["bf16", "fp32"]), (80, ["bf16"])])
def test_every_kernel_compiles_for_gpu(arch, dtypes, repo_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(repo_root))
    proc = subprocess.run([sys.executable, "-m", "dsv4.tools.compile_check", "--sizes", "tiny", "--arch", str(arch),
                           "--dtypes", *dtypes], cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("_")]
    built = {row[0] for row in rows}
    assert built == kernel_names(), f"not compiled: {kernel_names() - built}"
    for row in rows:  # every variant reports its registers (a cubin was produced and read back)
        assert re.fullmatch(r"\d+", row[-4]) and 0 < int(row[-4]) <= 255, row
    variants = {(row[0], row[3]) for row in rows if row[0] == "_attn_fwd_kernel"}
    assert len(variants) == 3 * len(dtypes), variants  # window, dense entries, top-k picks per dtype
