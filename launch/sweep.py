#!/usr/bin/env python
"""Sweep driver: every job of a Hydra sweep as its own (distributed) run. See dsv4/training/sweep.py.

    python launch/sweep.py --sweep lr_x_layout --ranks 2
    python launch/sweep.py --ranks 8 --launcher deepspeed train.lr=1e-3,3e-3 model=small
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsv4.training.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
