"""The Ray a build runs its encoders on, and the clean-up of what a killed build left of it.

By default a build starts a local Ray of its own (never one it finds running) with its files in a directory
named after the driver, `TMP/memvq-ray-PID-START` (START: the driver's start time, so a reused pid is told
apart), and stops it when the encode step ends: normally, on an error, on SIGINT and on SIGTERM (turned into
`SystemExit` while Ray runs). A driver killed with SIGKILL cannot stop anything, and Ray only fate-shares some
of its processes with the driver (on Linux, its agents outlive it); so every build first stops the processes
still holding files in the Ray directory of a driver that is gone, then removes that directory.

A cluster (`--ray-address`, or `RAY_ADDRESS` in the environment) is only connected to and disconnected from:
nothing on it is ever stopped. A Ray the caller initialised is used as it is and left running. The clean-up
reads `/proc` (Linux); elsewhere it does nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

DIR_PREFIX = "memvq-ray-"
AUTH_MODE = "RAY_AUTH_MODE"
PROC = Path("/proc")


def start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, from /proc); None if it is gone, a zombie, or there is
    no /proc."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the fields after "pid (name) "; name may hold spaces
    return None if fields[0] in ("Z", "X") else int(fields[19])  # state is field 3, starttime field 22


def processes_using(directory: Path) -> list[tuple[int, int]]:
    """(pid, start time) of the live processes that name `directory` on their command line or hold a file in it
    (all of a Ray's processes do: their logs and sockets live there), this process left out."""
    prefix = str(directory) + os.sep
    found = []
    for entry in PROC.iterdir() if PROC.is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            uses = any(prefix in arg or arg.endswith(str(directory)) for arg in arguments) or any(
                _link(fd).startswith(prefix) for fd in (entry / "fd").iterdir()
            )
        except OSError:  # gone meanwhile, or another user's
            continue
        started = start_time(int(entry.name))
        if uses and started is not None:
            found.append((int(entry.name), started))
    return found


def _link(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def stop_processes(processes: list[tuple[int, int]], wait_s: float = 10.0) -> None:
    """SIGKILL each (pid, start time) that is still that process, and wait until they are gone."""
    for pid, started in processes:
        if start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
    deadline = time.monotonic() + wait_s
    while any(start_time(pid) == started for pid, started in processes) and time.monotonic() < deadline:
        time.sleep(0.05)


def _driver(directory: Path) -> tuple[int, int] | None:
    """(pid, start time) of the driver a memvq Ray directory is named after; None if the name is not one."""
    pid, _, started = directory.name.removeprefix(DIR_PREFIX).partition("-")
    return (int(pid), int(started)) if pid.isdigit() and started.isdigit() else None


def stop_orphaned_ray(temp_root: Path | None = None) -> None:
    """Stop the Ray that killed builds left: for each memvq Ray directory in `temp_root` (default: the temporary
    directory) whose driver is gone, SIGKILL the processes still using it and remove it."""
    if not PROC.is_dir():
        return
    root = Path(temp_root or tempfile.gettempdir())
    for directory in sorted(root.glob(f"{DIR_PREFIX}*")):
        driver = _driver(directory)
        if driver is None or not directory.is_dir() or directory.stat().st_uid != os.getuid():
            continue
        pid, started = driver
        if start_time(pid) == started:
            continue  # that build is still running
        leftovers = processes_using(directory)
        if leftovers:
            log.warning(
                "stopping %d Ray processes left by a killed build (driver pid %d): %s",
                len(leftovers),
                pid,
                ", ".join(str(p) for p, _ in leftovers),
            )
            stop_processes(leftovers)
        shutil.rmtree(directory, ignore_errors=True)


def _restore_auth_mode(mode: str | None) -> None:
    """Put back the process's Ray token authentication mode. Starting a local Ray turns token authentication on for
    the whole process (`RAY_AUTH_MODE=token`, cached by Ray's C++ core) and it stays on after `ray.shutdown`, so a
    later connection to a cluster that does not use tokens would have its actors cancelled (their calls back to the
    driver are refused for want of a token)."""
    if mode is None:
        os.environ.pop(AUTH_MODE, None)
    else:
        os.environ[AUTH_MODE] = mode
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextmanager
def ray_for_build(address: str | None) -> Iterator[None]:
    """Ray for the body of the block: the caller's if it initialised one (left running), the cluster at `address`
    (or `RAY_ADDRESS`) if given (disconnected at the end), else (or for "local") a local Ray this build starts and
    stops, also on SIGINT and SIGTERM (see the module docstring)."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    own_dir = None
    if address == "local":
        own_dir = Path(tempfile.gettempdir()) / f"{DIR_PREFIX}{os.getpid()}-{start_time(os.getpid()) or 0}"
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    auth_mode = os.environ.get(AUTH_MODE)
    received: list[int] = []

    def exit_on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise SystemExit(128 + signum)

    try:
        ray.init(
            address=address,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            _temp_dir=None if own_dir is None else str(own_dir),
        )
        if main_thread:  # ray.init sets its own SIGTERM handler; ours makes the exit go through `finally`
            signal.signal(signal.SIGTERM, exit_on_signal)
        yield
    finally:
        try:
            ray.shutdown()
            if own_dir is not None:  # ray.shutdown stops them; never remove the directory of one it missed
                stop_processes(processes_using(own_dir))
                shutil.rmtree(own_dir, ignore_errors=True)
            if os.environ.get(AUTH_MODE) != auth_mode:
                _restore_auth_mode(auth_mode)
            if main_thread and previous is not None:
                signal.signal(signal.SIGTERM, previous)
        finally:
            # SIGTERM exits 143 even where Ray's C++ wait turned the handler's SystemExit into another error
            if received:
                raise SystemExit(128 + received[0])
