"""Train a DeepSeek-V4-attention decoder. Hydra composes the config (conf/); DeepSpeed runs it.

    python train.py                                   # one process (CPU or one GPU)
    deepspeed --num_gpus 2 train.py deepspeed=zero3   # several ranks (CPU ranks use gloo)
    torchrun --standalone --nproc_per_node 2 train.py
    python train.py -m train.lr=1e-3,3e-3 --ranks 2    # a sweep: each job its own run (dsv4/training/sweep.py)
"""

import os
import sys

from dsv4.training.distributed import strip_launcher_args

# The deepspeed launcher appends --local_rank=N, which Hydra rejects: move it to LOCAL_RANK first.
sys.argv = strip_launcher_args(sys.argv)

if len(sys.argv) > 1 and sys.argv[1] in ("-m", "--multirun"):
    # Hydra's multirun would run every job in this process; each job is a distributed run of its own instead
    from dsv4.training.sweep import main as sweep_main

    sys.exit(sweep_main(sys.argv[2:]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from data_pipelines import DataError
    from dsv4.config import ConfigError
    from dsv4.training.distributed import shutdown
    from dsv4.training.trainer import train

    try:
        train(cfg)
    except (ConfigError, DataError) as e:
        rank = os.environ.get("RANK", "0")
        print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        shutdown_code = 2
    else:
        shutdown_code = 0
    if shutdown_code:
        sys.stderr.flush()
        os._exit(shutdown_code)
    shutdown(0)


if __name__ == "__main__":
    main()
