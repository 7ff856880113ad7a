"""Handing the job script to ``sbatch`` or ``bsub``, and the job id in the answer."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from pathlib import Path

from umbrella_core.errors import ConfigError
from umbrella_core.launch.spec import LaunchSpec

__all__ = ["submit_command", "submit"]


def submit_command(spec: LaunchSpec, script: Path) -> tuple[list[str], bool]:
    """The submit command, and whether it reads the script on its standard input."""
    if spec.scheduler == "slurm":
        return ["sbatch", str(script)], False
    return ["bsub"], True


def submit(spec: LaunchSpec, script: Path) -> str:
    """Submit ``script``; the scheduler's answer (the job id is in it)."""
    argv, stdin = submit_command(spec, script)
    if shutil.which(argv[0]) is None:
        raise ConfigError(
            f"launch: {argv[0]} not found on PATH: submit from a "
            f"{spec.scheduler.upper()} login node, or give --dry-run to write the script only"
        )
    with open(script, "rb") if stdin else contextlib.nullcontext() as source:
        result = subprocess.run(
            argv,
            stdin=source if stdin else subprocess.DEVNULL,
            capture_output=True,
            cwd=spec.workdir,
        )
    out = result.stdout.decode(errors="replace").strip()
    err = result.stderr.decode(errors="replace").strip()
    if result.returncode != 0:
        said = "; ".join(line.strip() for line in (err or out).splitlines() if line.strip())
        raise ConfigError(
            f"launch: {' '.join(argv)} failed (exit {result.returncode}): {said or 'no message'}"
        )
    return out


def job_id(answer: str) -> str | None:
    found = re.search(r"Submitted batch job (\d+)|Job <(\d+)>", answer)
    return next((g for g in found.groups() if g), None) if found else None
