"""What the checkpoint checksums cost: a checkpoint-sized shard is written the way DeepSpeed writes one
(torch.save), then checksummed the way `save_checkpoint` does right after writing (xxh3-128 over the file, from the
page cache), and verified again as a resume does. Prints seconds, GB/s and the checksum's share of the save.

    python benchmarks/checkpoint_checksum.py                        # 1 GiB in the system temp directory
    python benchmarks/checkpoint_checksum.py --mib 4096 --dir /shared/checkpoints    # on the checkpoint filesystem
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsv4.run_files import HASH, file_checksum  # noqa: E402


def measure(mib: int, directory: Path, repeats: int) -> list[dict[str, float]]:
    state = {"fp32_partition": torch.randn(mib * 2**20 // 4)}  # what one rank's optimizer shard holds
    rows = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            path = Path(tmp) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
            t0 = time.perf_counter()
            torch.save(state, path)
            t1 = time.perf_counter()
            first = file_checksum(path)
            t2 = time.perf_counter()
            assert file_checksum(path) == first
            t3 = time.perf_counter()
            size = path.stat().st_size
        rows.append({"gb": size / 1e9, "save_s": t1 - t0, "checksum_s": t2 - t1, "verify_s": t3 - t2})
    return rows


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments (naming the flag), before a byte is written; None when nothing is."""
    if args.mib < 1:
        return f"--mib={args.mib}: must be >= 1"
    if args.repeats < 1:
        return f"--repeats={args.repeats}: must be >= 1"
    if not args.dir.is_dir():
        return f"--dir={args.dir}: no such directory; give an existing directory on the filesystem to measure"
    try:
        with tempfile.TemporaryFile(dir=args.dir):
            pass
    except OSError as e:
        return f"--dir={args.dir}: cannot write there ({e.strerror}); give a writable directory"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="shard size in MiB (default 1024)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to write it")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    print(f"{HASH} checksums of a {args.mib} MiB torch.save shard in {args.dir}")
    print(f"{'GB':>6} {'save s':>8} {'save GB/s':>10} {'checksum s':>11} {'checksum GB/s':>14} {'verify s':>9} "
          f"{'checksum/save':>14}")
    for r in measure(args.mib, args.dir, args.repeats):
        print(f"{r['gb']:>6.2f} {r['save_s']:>8.3f} {r['gb'] / r['save_s']:>10.2f} {r['checksum_s']:>11.3f} "
              f"{r['gb'] / r['checksum_s']:>14.2f} {r['verify_s']:>9.3f} {r['checksum_s'] / r['save_s']:>13.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
