"""On the nodes: the torchrun agent and the stale lock (``python -m umbrella_core.launch``).

The job script runs ``python -m umbrella_core.launch agent ...`` on each node
and ``... release-lock RUN_DIR HOSTS_FILE`` on the batch host; torch is
imported only when the agent starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["forward_stop_file", "release_stale_lock", "main"]


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[-1].split()  # the name may hold spaces
            if len(fields) > 1 and fields[1] == str(pid):
                found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a process that ended but is not reaped yet does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def forward_stop_file(
    stop_file: str,
    *,
    interval: float = 0.5,
    log: Callable[[str], None] | None = None,
    stopping: threading.Event | None = None,
) -> threading.Thread:
    """Send SIGTERM once to each child of this process once ``stop_file`` exists.

    Watches in a daemon thread; children started later get theirs too.
    ``stopping`` is set when the file appears.
    """
    import signal

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))

    def watch() -> None:
        while not os.path.exists(stop_file):
            time.sleep(interval)
        if stopping is not None:
            stopping.set()
        log(f"umbrella launch agent: {stop_file}: asking the ranks to save and stop")
        told: set[int] = set()
        while True:
            for pid in _children(os.getpid()):
                if pid not in told:
                    told.add(pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
            time.sleep(interval)

    thread = threading.Thread(target=watch, name="umbrella-stop-file", daemon=True)
    thread.start()
    return thread


def _agent(argv: Sequence[str]) -> int:
    """torchrun, in this process, but passing no SIGTERM on to its ranks."""
    import signal

    parser = argparse.ArgumentParser(
        prog="python -m umbrella_core.launch agent",
        description="torchrun that leaves SIGTERM to the scheduler and stops its ranks "
        "once STOP_FILE exists",
    )
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--chdir")
    parser.add_argument(
        "--grace",
        type=float,
        default=300.0,
        help="once stopping, how long ranks that are still saving are waited for",
    )
    parser.add_argument("torchrun_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(list(argv))
    torchrun_args = list(args.torchrun_args)
    if torchrun_args[:1] == ["--"]:
        torchrun_args = torchrun_args[1:]
    if args.chdir:
        os.chdir(args.chdir)

    stopping = threading.Event()

    def on_term(signum: int, frame: Any = None) -> None:
        stopping.set()
        print(
            "umbrella launch agent: SIGTERM: not passed on (it reached the ranks too)",
            file=sys.stderr,
            flush=True,
        )

    signal.signal(signal.SIGTERM, on_term)
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing import api
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun installs this handler (looked up at start) for SIGTERM, SIGINT...;
    # for SIGTERM it would send each rank a second SIGTERM.
    torch_handler = getattr(api, "_terminate_process_handler", None)
    if torch_handler is not None:

        def handler(signum: int, frame: Any) -> None:
            if signum == signal.SIGTERM:
                on_term(signum, frame)
                return
            torch_handler(signum, frame)

        api._terminate_process_handler = handler
    else:  # pragma: no cover - a torch without it
        print("umbrella launch agent: torchrun passes SIGTERM on here", file=sys.stderr)
    # The first rank to exit 143 makes torchrun end the others with SIGTERM: a
    # second one for a rank still saving (rank 0 renames the checkpoint last).
    # Once stopping, the ranks are given their grace to end by themselves.
    close = api.PContext.close

    def patient_close(self: Any, death_sig: Any = None, timeout: int = 30) -> None:
        if stopping.is_set():
            end = time.monotonic() + args.grace
            while time.monotonic() < end and any(_running(p) for p in self.pids().values()):
                time.sleep(0.2)
        close(self, death_sig, timeout)

    api.PContext.close = patient_close  # type: ignore[method-assign]  # the patch is the point
    forward_stop_file(args.stop_file, stopping=stopping)
    try:
        run.main(torchrun_args)
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        # Every rank ended on SIGTERM (143: saved; -15: a second one): tell the job script.
        return 143 if codes and codes <= {143, -15} else 1
    return 0


def release_stale_lock(run_dir: str | os.PathLike, hosts_file: str | os.PathLike) -> Path | None:
    """Remove the run's lock if this job's previous start left it; the lock removed, or None.

    ``hosts_file`` lists the hosts of the previous start of this job (its
    modification time: that start). A lock of one of them, taken since, is
    that start's: its hosts are no longer this job's, or they were lost.
    """
    from umbrella_core.processes import process_alive
    from umbrella_core.train.run_folder import LOCK_FILE

    lock = Path(run_dir) / LOCK_FILE
    hosts_path = Path(hosts_file)
    try:
        held = json.loads(lock.read_text())
        hosts = set(hosts_path.read_text().split())
        started = datetime.strptime(held["started"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
        since = hosts_path.stat().st_mtime
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # A minute of slack for clocks that differ between hosts.
    if held.get("host") not in hosts or started < since - 60:
        return None
    pid = held.get("pid")
    if held.get("host") == socket.gethostname() and isinstance(pid, int) and process_alive(pid):
        return None  # a run of this host is still at work: its lock is not stale
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
    return lock


def main(argv: Sequence[str]) -> int:
    """``python -m umbrella_core.launch agent ... | release-lock ...``; its exit status."""
    if argv[:1] == ["agent"]:
        return _agent(argv[1:])
    if argv[:1] == ["release-lock"] and len(argv) == 3:
        removed = release_stale_lock(argv[1], argv[2])
        if removed is not None:
            print(
                f"umbrella launch: removed {removed}, left by this job's previous start",
                file=sys.stderr,
            )
        return 0
    print(
        "usage: python -m umbrella_core.launch agent --stop-file FILE [--chdir DIR] -- "
        "TORCHRUN ARGS | release-lock RUN_DIR HOSTS_FILE",
        file=sys.stderr,
    )
    return 2
