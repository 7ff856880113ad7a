"""The ``umbrella launch`` command: a training run as a SLURM or LSF job on many nodes."""

from __future__ import annotations

import argparse
import shlex
import sys

from umbrella_core.errors import ConfigError
from umbrella_core.hookspecs import hookimpl
from umbrella_core.launch.scripts import log_path, render_script, script_path
from umbrella_core.launch.spec import SCHEDULERS, LaunchSpec
from umbrella_core.launch.submit import job_id, submit, submit_command
from umbrella_core.types import Command

__all__ = ["LAUNCH", "umbrella_commands"]


def _train_parser() -> argparse.ArgumentParser:
    """``umbrella train``'s parser: it checks the train arguments a job is given."""
    from umbrella_core.commands.train import TRAIN

    parser = argparse.ArgumentParser(prog="umbrella train", description=TRAIN.help)
    TRAIN.add_arguments(parser)
    return parser


def _launch(args: argparse.Namespace) -> int:
    spec = LaunchSpec.from_arguments(args, _train_parser())
    path = script_path(spec)
    text = render_script(spec)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise ConfigError(
            f"launch: cannot write the job script {path}: {exc.strerror or exc}; "
            "give a writable --output-dir"
        ) from None
    argv, stdin = submit_command(spec, path)
    shown = " ".join(shlex.quote(a) for a in argv)
    if stdin:
        shown += f" < {shlex.quote(str(path))}"
    if args.dry_run:
        print(f"script: {path}")
        print(text, end="")
        print(f"submit: {shown}  (not run: --dry-run)")
        return 0
    answer = submit(spec, path)
    print(answer)
    job = job_id(answer)
    if job:
        print(f"script: {path}\nlog: {log_path(spec, job)}")
    return 0


def _arguments(p: argparse.ArgumentParser) -> None:
    p.usage = (
        "umbrella launch --scheduler slurm|lsf [--nodes N] --gpus-per-node G [options] "
        "-- train [train arguments]"
    )
    p.add_argument("--scheduler", required=True, choices=SCHEDULERS)
    p.add_argument("--nodes", type=int, default=1, help="hosts (default 1)")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per host; 0: CPU hosts")
    p.add_argument(
        "--procs-per-node", type=int, help="ranks per host (default: the GPUs, or 1 without)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="write and show the script; submit nothing"
    )
    p.add_argument("--job-name", default="umbrella")
    p.add_argument("--time", help="run limit: minutes, H:MM:SS or D-H:MM:SS")
    p.add_argument("--partition", "--queue", dest="partition", help="SLURM partition / LSF queue")
    p.add_argument("--account", "--project", dest="account", help="SLURM account / LSF project")
    p.add_argument("--cpus-per-gpu", type=int, help="CPU cores per rank")
    p.add_argument(
        "--mem",
        help="memory per host (SLURM --mem, e.g. 256G; LSF rusage[mem=...], in the "
        "cluster's units)",
    )
    p.add_argument("--port", type=int, default=29500, help="rendezvous port (default 29500)")
    p.add_argument(
        "--output-dir",
        help="the script and logs go in OUTPUT_DIR/launch/ (default: the run's output folder)",
    )
    p.add_argument(
        "--cache",
        help="UMBRELLA_CACHE of the job, on a shared file system (default: $UMBRELLA_CACHE)",
    )
    p.add_argument("--env", action="append", metavar="NAME=VALUE", help="export it (repeatable)")
    p.add_argument(
        "--setup",
        action="append",
        metavar="LINES",
        help='shell lines run first, e.g. "module load cuda" (repeatable)',
    )
    p.add_argument(
        "--python", default=sys.executable, help="the nodes' interpreter (default: this one)"
    )
    p.add_argument(
        "--signal-grace",
        type=int,
        default=300,
        metavar="SECONDS",
        help="ask the ranks to save and stop this long before the run limit "
        "(default 300; 0: never)",
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="do not add --resume: each start of the job starts the run over",
    )
    p.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- train ...")


LAUNCH = Command(
    name="launch",
    help="run umbrella train as a SLURM or LSF job on many nodes (requeued, resumed)",
    description=(
        "Write a job script that starts one torchrun agent per node (c10d rendezvous "
        "on the first host) running the train command given after --, with --resume, "
        "and submit it (sbatch / bsub), or only write and show it (--dry-run). "
        "--signal-grace seconds before the run limit every rank saves a checkpoint and stops, "
        "and the job is requeued; its next start continues the run. The script and the "
        "logs go in OUTPUT_DIR/launch/."
    ),
    add_arguments=_arguments,
    run=_launch,
)


@hookimpl
def umbrella_commands() -> list[Command]:
    return [LAUNCH]
