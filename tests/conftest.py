"""Test environment: CPU only, no network, offline W&B; shared helpers."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# under pytest-xdist (README: `-n 2`), the workers share the cores: each uses its share, so two torch thread pools do
# not spin against each other (subprocesses inherit it unless a test sets OMP_NUM_THREADS itself)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
try:  # Triton kernels run on the GPU when there is one, else under the interpreter (tiny shapes)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "dist: spawns several CPU ranks (gloo)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture
def repo_root() -> Path:
    return ROOT
