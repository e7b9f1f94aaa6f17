"""torch's JIT-build locks: a stale one must not make every later run wait forever in silence.

DeepSpeed JIT-compiles its ops with torch.utils.cpp_extension (on the CPU, `deepspeed_shm_comm` at every process
group start-up; `fused_adam` / `cpu_adam` when a config needs them). torch serialises a build with a `FileBaton`:
`<extensions root>/<op>/lock`, created with O_EXCL and removed when the build ends. Other processes poll until the
file is gone, forever and without a word. A process killed while building (kill -9, a SIGTERM, a Ctrl-C that
exits at once) leaves the file behind, and every later run hangs at start-up.

The rule (`lock_users`, `judge`): the baton has no owner pid, but its holder keeps the file it created with
O_EXCL open for the whole build, and ninja and the compiler run with the build directory as their working
directory (they outlive a parent killed with -9). So a lock that no process on this machine has open, and in
whose directory no process works, belongs to no live build on this machine: it is removed with a warning naming
it. A build on another machine is invisible from here, so when the extensions root is on a network filesystem
(shared by several nodes) such a lock is removed only once nothing in its directory has changed for
NETWORK_QUIET_S; until then the run says what it waits for and how to go on (`rm <lock>`). A live lock held on
this machine is waited for, with a line saying so.

A process that exits at once from a signal handler during start-up calls `release_held_locks()`: it stops the
compiler it started and removes the lock it holds (train.py's and signals.py's immediate exits do)."""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

SHM_OP = "deepspeed_shm_comm"
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "9p",
              "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "panfs", "afs")
NETWORK_QUIET_S = 600.0  # a compile can go 60 s without writing a file (measured on a loaded 2-core machine)
POLL_S = 0.2

_root: Path | None = None  # the extensions root this process checked; release_held_locks() looks only there


def extensions_root() -> Path:
    """Where torch builds extensions: $TORCH_EXTENSIONS_DIR, else its user cache dir / py<ver>_<accelerator>
    (torch.utils.cpp_extension._get_build_directory, without creating anything)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    import torch  # late: signal handling imports this module before (or without) torch, which takes seconds
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def lock_users(lock: Path) -> list[str] | None:
    """The processes on this machine that hold `lock` open or work in its directory ("pid 12 (python) holds
    it"); None where /proc cannot tell (not Linux)."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    lock_s, build_s = os.path.realpath(lock), os.path.realpath(lock.parent)
    users: list[str] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = entry.name
        what = None
        try:
            if os.readlink(f"/proc/{pid}/cwd") == build_s:
                what = "builds in its directory"
        except OSError:
            pass
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            fds = []
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == lock_s:
                    what = "holds it"
                    break
            except OSError:
                continue
        if what is not None:
            users.append(f"pid {pid} ({_name(pid)}) {what}")
    return users


def _name(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` (the longest mount point above it), or "" if unknown."""
    target, best, fstype = os.path.realpath(path), "", ""
    try:
        partitions = psutil.disk_partitions(all=True)
    except OSError:
        return ""
    for part in partitions:
        mount = part.mountpoint.rstrip("/") or "/"
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best, fstype = mount, part.fstype
    return fstype


def _quiet_for(directory: Path) -> float:
    """Seconds since anything in `directory` (the lock included) last changed."""
    newest = 0.0
    for p in [directory, *directory.iterdir()]:
        try:
            newest = max(newest, p.stat().st_mtime)
        except OSError:
            continue
    return time.time() - newest


def judge(lock: Path) -> tuple[str, str]:
    """("gone" | "live" | "wait" | "stale", why) for a lock file, by the rule in the module docstring."""
    if not lock.exists():
        return "gone", ""
    users = lock_users(lock)
    if users is None:
        return "wait", "which process holds it cannot be told on this system"
    if users:
        return "live", ", ".join(users)
    fstype = filesystem_type(lock.parent)
    if fstype in NETWORK_FS or fstype.startswith("nfs"):
        quiet = _quiet_for(lock.parent)
        if quiet < NETWORK_QUIET_S:
            return "wait", (f"no process on this machine holds it, but {lock.parent} is on {fstype}, where a build "
                            f"on another machine is invisible from here; treated as stale after {NETWORK_QUIET_S:.0f} "
                            f"s without a change there (now {quiet:.0f} s)")
    return "stale", f"no process on this machine holds it or builds in {lock.parent}"


def _remove_if_unchanged(lock: Path, seen: os.stat_result) -> bool:
    """Unlink `lock` only if it is still the file judged stale (not a new build's lock created since)."""
    try:
        now = lock.stat()
    except FileNotFoundError:
        return False
    if (now.st_ino, now.st_ctime_ns) != (seen.st_ino, seen.st_ctime_ns):
        return False
    lock.unlink(missing_ok=True)
    return True


def _serialised(root: Path) -> int | None:
    """An flock on the extensions root directory: the ranks of a run judge and remove locks one at a time (the
    kernel drops an flock when its process dies, so this one can never go stale)."""
    try:
        fd = os.open(root, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # a filesystem without flock: judge without it
        pass
    return fd


def clear_stale(lock: Path, say: Callable[[str], None]) -> tuple[str, str]:
    """Judge `lock` once and remove it, with a warning, when stale -> (verdict, why); "gone" once removed."""
    fd = _serialised(lock.parent.parent)
    try:
        try:
            seen = lock.stat()
        except FileNotFoundError:
            return "gone", ""
        verdict, why = judge(lock)
        if verdict == "stale":
            if _remove_if_unchanged(lock, seen):
                say(f"warning: removed the stale build lock {lock} ({why}: a run was killed while torch built "
                    f"{lock.parent.name}); left there, it would make every later run wait forever")
            return "gone", ""
        return verdict, why
    finally:
        if fd is not None:
            os.close(fd)


def wait_for(lock: Path, say: Callable[[str], None], announce: bool) -> None:
    """Until `lock` is gone or found stale (and removed); says what it waits for (once per verdict) when
    `announce`."""
    said = ""
    while True:
        verdict, why = clear_stale(lock, say)
        if verdict == "gone":
            return
        if announce and verdict != said:
            if verdict == "live":
                say(f"waiting for another build of {lock.parent.name} to finish ({why}; lock {lock})")
            else:
                say(f"waiting on the build lock {lock}: {why}. If no build is running anywhere: rm {lock}")
            said = verdict
        time.sleep(POLL_S if verdict == "live" else 5.0)


def op_is_built(root: Path, op: str = SHM_OP) -> bool:
    return (root / op / f"{op}.so").is_file()


def prepare_jit_builds(say: Callable[[str], None], announce: bool, shm_jit: bool) -> None:
    """Before DeepSpeed starts the process group: remove stale build locks of every op under the extensions root;
    wait (saying so) on a live lock of the shm_comm op when this process will build or load it (`shm_jit`); say
    when that op is not built yet. `announce`: this process prints the informational lines (local rank 0)."""
    global _root
    root = _root = extensions_root()
    if not root.is_dir():
        if shm_jit and announce:
            say(f"building DeepSpeed's shm_comm op (first run only, ~25 s)... (in {root / SHM_OP})")
        return
    for lock in sorted(root.glob("*/lock")):
        if lock.parent.name != SHM_OP or not shm_jit:
            clear_stale(lock, say)  # an op this run may build later: never wait on it here
    if not shm_jit:
        return
    first = not op_is_built(root)
    if first and announce:
        say(f"building DeepSpeed's shm_comm op (first run only, ~25 s)... (in {root / SHM_OP})")
    wait_for(root / SHM_OP / "lock", say, announce and not first)


def release_held_locks() -> None:
    """From a handler that exits at once: stop the compilers this process started in a build directory whose lock
    it holds, and remove that lock (else the next run would find it). Never raises."""
    root = _root
    if root is None or not os.path.isdir("/proc/self/fd"):
        return
    try:
        root_s = os.path.realpath(root)
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if os.path.basename(target) != "lock" or os.path.dirname(os.path.dirname(target)) != root_s:
                continue
            _stop_builders(os.path.dirname(target))
            os.unlink(target)
    except Exception:  # leaving anyway
        pass


def _stop_builders(build_dir: str) -> None:
    """SIGKILL this process's descendants that work in `build_dir` (ninja and the compiler)."""
    for child in psutil.Process().children(recursive=True):
        try:
            if os.path.realpath(child.cwd()) == build_dir:
                os.kill(child.pid, signal.SIGKILL)
        except (psutil.Error, OSError):
            continue
