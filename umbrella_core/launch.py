"""``umbrella launch``: ``umbrella train`` as a SLURM or LSF job over many nodes.

:class:`LaunchSpec` holds what the job is; :func:`render_script` turns it into
the job script (pure: text from the value), :func:`submit` hands the script to
``sbatch`` or ``bsub``. The script starts one task per node (``srun``, or
``blaunch`` on LSF), each a torchrun agent whose c10d rendezvous is on the
job's first host, so the job's ranks are ``nodes x procs_per_node``.

How a job survives its time limit and is requeued, and why it is built so:

* **One SIGTERM per rank, ever.** ``umbrella train`` saves a checkpoint at the
  end of the step on its first SIGTERM and stops at once on a second
  (train/faults.py). The scheduler's own SIGTERM (preemption, ``scancel``,
  the time limit's end) reaches every process of the job: on SLURM slurmstepd
  signals each process of a step (srun itself turns a SIGTERM into a SIGKILL
  of its step); on LSF, every process it tracks (all of the job's with cgroup
  process tracking; else the ranks, in sessions of their own, may not get it,
  and stop without saving). So nothing here forwards a SIGTERM: the agent does not pass
  its own on to its ranks (torchrun would), and the job script does not
  pass on the one it gets.
* **The warning is another signal.** SLURM sends ``USR1`` to the batch shell
  alone (``--signal=B:USR1@GRACE``); LSF sends ``URG`` (``-wa URG -wt MIN``),
  ignored by every process it reaches but the script, which traps it. The
  script then writes ``LAUNCH_DIR/stop-JOBID`` on the shared file system;
  each node's agent sees it and sends SIGTERM once to each of its ranks; they
  save, exit 143, and the script requeues the job (``scontrol requeue`` /
  ``brequeue``). Writing that file by hand stops a run with a checkpoint.
* **Resuming.** The train command gets ``--resume`` (``trainer.resume=auto``:
  the latest complete checkpoint, a fresh start while there is none), so each
  start of a requeued job continues the run.
* **A node lost for good** leaves the run's lock naming a dead host; a
  requeued start of the same job removes a lock held on one of the hosts of
  its previous start (``LAUNCH_DIR/JOBID.hosts``), as nothing else can.

``python -m umbrella_core.launch agent|release-lock`` are the two pieces the
script runs on the nodes. (Since 0.3.)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import attrs

from umbrella_core.errors import ConfigError

__all__ = [
    "SCHEDULERS",
    "LaunchSpec",
    "parse_duration",
    "render_script",
    "script_path",
    "submit_command",
    "submit",
    "add_launch_parser",
    "release_stale_lock",
]

SCHEDULERS = ("slurm", "lsf")

#: How the launched train command resumes: ``add`` appends ``--resume``;
#: ``given``: the user's train arguments or config already say ``auto``;
#: ``on-checkpoint``: they name a checkpoint to start from, and a later start
#: (once the run folder holds a checkpoint of its own) adds ``--resume``, which
#: wins over it; ``off``: nothing (``--no-resume``).
RESUME_MODES = ("add", "given", "on-checkpoint", "off")

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_DIRECTIVE_VALUE = re.compile(r"^[^\s\"'\\#]+$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# -- the value -----------------------------------------------------------------


def _at_least(low: int, high: int | None = None) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and (value < low or (high is not None and value > high)):
            option = attribute.name.removesuffix("_s").replace("_", "-")
            bounds = f">= {low}" if high is None else f"{low} to {high}"
            raise ConfigError(f"launch --{option}: {value}: expected {bounds}")

    return check


def _matches(pattern: re.Pattern[str], what: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value and not pattern.match(value):
            raise ConfigError(
                f"launch --{attribute.name.replace('_', '-')}: {value!r} is not {what}"
            )

    return check


def _one_of(options: Sequence[str]) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in options:
            expected = " or ".join(options)
            raise ConfigError(f"launch {attribute.name}: {value!r}: expected {expected}")

    return check


def _require_train(args: Sequence[str]) -> None:
    if not args or args[0] != "train":
        raise ConfigError(
            "launch: give the train command after --, e.g. umbrella launch ... -- train "
            "--config run.yaml (only train is launched)"
        )


def _train_args(instance: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    _require_train(value)


def _absolute(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not os.path.isabs(value):
        raise ConfigError(f"launch {attribute.name}: {value}: expected an absolute path")
    if attribute.name == "launch_dir" and re.search(r"\s", value):
        # sbatch and bsub directives split on white space.
        raise ConfigError(
            f"launch: the log folder {value} holds white space, which #SBATCH/#BSUB lines "
            "cannot carry; give another --output-dir"
        )


def _env_pairs(instance: Any, attribute: attrs.Attribute, value: tuple[tuple[str, str], ...]):
    for key, _ in value:
        if not _ENV_KEY.match(key):
            raise ConfigError(f"launch --env {key}=...: {key!r} is not a variable name")


@attrs.frozen(kw_only=True)
class LaunchSpec:
    """One cluster job running ``umbrella train``.

    Attributes:
        scheduler: ``slurm`` or ``lsf``.
        nodes: Hosts of the job, one torchrun agent on each.
        gpus_per_node: GPUs to ask for per host; 0: CPU hosts.
        procs_per_node: Ranks per host (default: ``gpus_per_node``, or 1
            without GPUs).
        train_args: ``train`` and its arguments, as ``umbrella train`` takes them.
        run_dir: The run's output folder (absolute): checkpoints and lock.
        launch_dir: Where the script, the logs and the stop file go (absolute).
        workdir: The folder the job runs in (relative paths of the train
            arguments are relative to it).
        python: The interpreter of every node (the same environment as here).
        resume: One of :data:`RESUME_MODES`.
        job_name: The scheduler's job name.
        time_s: The run limit in seconds (None: the queue's default).
        partition: SLURM partition / LSF queue.
        account: SLURM account / LSF project.
        cpus_per_gpu: CPU cores per rank (None: the scheduler's default).
        mem: Memory per host, in the scheduler's own spelling (``256G``).
        port: The rendezvous port on the first host.
        cache: ``UMBRELLA_CACHE`` of the job ("" to leave it as the nodes have it).
        env: Further ``(name, value)`` exported in the script.
        setup: Shell lines run before the launch (``module load cuda``).
        signal_grace: Seconds before the time limit at which the ranks are
            asked to save and stop (0: no warning).
    """

    scheduler: str = attrs.field(converter=str.lower, validator=_one_of(SCHEDULERS))
    nodes: int = attrs.field(validator=_at_least(1))
    gpus_per_node: int = attrs.field(validator=_at_least(0))
    procs_per_node: int | None = attrs.field(default=None, validator=_at_least(1))
    train_args: tuple[str, ...] = attrs.field(converter=tuple, validator=_train_args)
    run_dir: str = attrs.field(validator=_absolute)
    launch_dir: str = attrs.field(validator=_absolute)
    workdir: str = attrs.field(validator=_absolute)
    python: str
    resume: str = attrs.field(default="add", validator=_one_of(RESUME_MODES))
    job_name: str = attrs.field(
        default="umbrella", validator=_matches(_NAME, "a job name (letters, digits, ._+-)")
    )
    time_s: int | None = attrs.field(default=None, validator=_at_least(60))
    partition: str = attrs.field(default="", validator=_matches(_DIRECTIVE_VALUE, "one word"))
    account: str = attrs.field(default="", validator=_matches(_DIRECTIVE_VALUE, "one word"))
    cpus_per_gpu: int | None = attrs.field(default=None, validator=_at_least(1))
    mem: str = attrs.field(default="", validator=_matches(_DIRECTIVE_VALUE, "one word"))
    port: int = attrs.field(default=29500, validator=_at_least(1, 65535))
    cache: str = ""
    env: tuple[tuple[str, str], ...] = attrs.field(
        default=(), converter=lambda pairs: tuple(tuple(p) for p in pairs), validator=_env_pairs
    )
    setup: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    signal_grace: int = attrs.field(default=300, validator=_at_least(0))

    def __attrs_post_init__(self) -> None:
        if self.time_s is not None and self.signal_grace >= self.time_s:
            raise ConfigError(
                f"launch --signal-grace {self.signal_grace}: not shorter than --time "
                f"({self.time_s} s); give a shorter grace or a longer time"
            )

    @property
    def nproc(self) -> int:
        """Ranks per host."""
        return self.procs_per_node or self.gpus_per_node or 1

    @property
    def slots_per_node(self) -> int:
        """CPU cores per host asked for (LSF slots), or the ranks when not given."""
        return self.nproc * (self.cpus_per_gpu or 1)

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, train_parser: Any) -> LaunchSpec:
        """The job ``umbrella launch`` was asked for (its parsed command line).

        The train arguments are parsed as ``umbrella train`` parses them and the
        run's configuration is read here, so that a mistake in either is found
        before the job waits in a queue.
        """
        from umbrella_core.config import load_config

        train_args = list(args.train_args or [])
        if train_args[:1] == ["--"]:
            train_args = train_args[1:]
        _require_train(train_args)
        parsed = _parse_train(train_parser, train_args[1:])
        config = load_config(parsed.config, list(parsed.set or []))
        workdir = os.path.abspath(os.getcwd())
        run_dir = os.path.abspath(
            os.path.expanduser(parsed.output_dir or config.trainer.output_dir)
        )
        logs = os.path.abspath(os.path.expanduser(args.output_dir or run_dir))
        cache = args.cache if args.cache is not None else os.environ.get("UMBRELLA_CACHE", "")
        return cls(
            scheduler=args.scheduler,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            procs_per_node=args.procs_per_node,
            train_args=train_args,
            run_dir=run_dir,
            launch_dir=os.path.join(logs, "launch"),
            workdir=workdir,
            python=os.path.abspath(args.python),
            resume=_resume_mode(parsed, config, off=args.no_resume),
            job_name=args.job_name,
            time_s=parse_duration(args.time) if args.time else None,
            partition=args.partition or "",
            account=args.account or "",
            cpus_per_gpu=args.cpus_per_gpu,
            mem=args.mem or "",
            port=args.port,
            cache=os.path.abspath(os.path.expanduser(cache)) if cache else "",
            env=[_env_pair(item) for item in args.env or ()],
            setup=args.setup or (),
            signal_grace=args.signal_grace,
        )


def _parse_train(train_parser: Any, argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` parsed by ``umbrella train``'s parser; its complaint as a ConfigError."""
    parser = copy.copy(train_parser)

    def refuse(message: str) -> None:
        raise ConfigError(f"launch: the train arguments after --: {message}")

    parser.error = refuse
    return parser.parse_args(list(argv))


def _resume_mode(parsed: argparse.Namespace, config: Any, *, off: bool) -> str:
    if off:
        return "off"
    if parsed.overwrite or config.trainer.overwrite:
        raise ConfigError(
            "launch: train --overwrite in a job that is requeued would remove the run's own "
            "checkpoints at each start: remove the earlier outputs before launching, or give "
            "launch --no-resume"
        )
    given = parsed.resume if parsed.resume is not None else config.trainer.resume
    if not given:
        return "add"
    return "given" if given == "auto" else "on-checkpoint"


def _env_pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"launch --env {item}: expected NAME=VALUE")
    return key, value


def parse_duration(text: str) -> int:
    """Seconds in ``MINUTES``, ``H:MM:SS`` or ``D-H:MM:SS`` (a run limit)."""
    text = text.strip()
    if text.isdigit():
        return int(text) * 60
    found = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{1,2}):(\d{1,2})", text)
    if not found:
        raise ConfigError(
            f"launch --time {text}: expected minutes (90), H:MM:SS (24:00:00) or D-H:MM:SS"
        )
    days, hours, minutes, seconds = (int(g or 0) for g in found.groups())
    if minutes > 59 or seconds > 59:
        raise ConfigError(f"launch --time {text}: minutes and seconds go up to 59")
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _slurm_time(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    clock = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}-{clock}" if days else clock


def _lsf_minutes(seconds: int) -> str:
    minutes = math.ceil(seconds / 60)
    return f"{minutes // 60}:{minutes % 60:02d}"


# -- the script ----------------------------------------------------------------


def script_path(spec: LaunchSpec) -> Path:
    """Where the job script is written."""
    suffix = "sbatch" if spec.scheduler == "slurm" else "bsub"
    return Path(spec.launch_dir) / f"{spec.job_name}.{suffix}"


def log_path(spec: LaunchSpec, job_id: str) -> Path:
    """The job's log (both streams; a requeued start appends to it)."""
    name = f"{spec.job_name}-{job_id}.out" if spec.scheduler == "slurm" else f"{job_id}.out"
    return Path(spec.launch_dir) / name


def render_script(spec: LaunchSpec) -> str:
    """The job script: directives, environment, per-node launch, signals, requeue."""
    q = shlex.quote
    if spec.scheduler == "slurm":
        head = _slurm_directives(spec)
    else:
        head = _lsf_directives(spec)
    lines = ["#!/bin/bash", *head, ""]
    lines += [
        "# Written by `umbrella launch`; submit it again as it is ("
        + ("sbatch FILE" if spec.scheduler == "slurm" else "bsub < FILE")
        + "). Each start of the job",
        "# continues the run from its last checkpoint; see umbrella_core/launch.py.",
        "",
        *_environment(spec),
        f"PYTHON={q(spec.python)}",
        f"RUN_DIR={q(spec.run_dir)}",
        f"LAUNCH_DIR={q(spec.launch_dir)}",
        "",
    ]
    lines += _slurm_hosts() if spec.scheduler == "slurm" else _lsf_hosts()
    lines += [
        f'if [ -z "$HOSTS" ] || [ "$(printf "%s\\n" $HOSTS | wc -l)" -ne {spec.nodes} ]; then',
        f'    echo "umbrella launch: expected {spec.nodes} host(s), the job has: $HOSTS" >&2',
        "    exit 1",
        "fi",
        'STOP_FILE="$LAUNCH_DIR/stop-$JOB_ID"',
        'rm -f "$STOP_FILE"',
        "# A lock left by this job's previous start (a node lost with its rank) goes.",
        '"$PYTHON" -m umbrella_core.launch release-lock "$RUN_DIR" "$LAUNCH_DIR/$JOB_ID.hosts"',
        'printf "%s\\n" $HOSTS > "$LAUNCH_DIR/$JOB_ID.hosts"',
        'echo "umbrella launch: job $JOB_ID on $HOSTS (rendezvous $MASTER:' + f'{spec.port})" >&2',
        "",
        *_command(spec),
        "",
        *_signals(spec),
        "",
        *_wait_function(),
        "",
    ]
    lines += _slurm_launch(spec) if spec.scheduler == "slurm" else _lsf_launch(spec)
    requeue = 'scontrol requeue "$JOB_ID"' if spec.scheduler == "slurm" else 'brequeue "$JOB_ID"'
    lines += [
        "",
        "# Stopped by the warning before the run limit: in the queue again, to go on.",
        'if [ "$rc" -ne 0 ] && [ "$warned" = 1 ] && [ "$stopped" = 0 ]; then',
        '    echo "umbrella launch: requeueing job $JOB_ID; its next start resumes the run" >&2',
        f"    {requeue} || echo \"umbrella launch: could not requeue job $JOB_ID; submit "
        f'{script_path(spec)} again to go on\" >&2',
        "fi",
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def _slurm_directives(spec: LaunchSpec) -> list[str]:
    d = [
        f"--job-name={spec.job_name}",
        f"--nodes={spec.nodes}",
        "--ntasks-per-node=1",
    ]
    if spec.gpus_per_node:
        d.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_gpu:
        d.append(f"--cpus-per-task={spec.slots_per_node}")
    if spec.mem:
        d.append(f"--mem={spec.mem}")
    if spec.time_s:
        d.append(f"--time={_slurm_time(spec.time_s)}")
    if spec.partition:
        d.append(f"--partition={spec.partition}")
    if spec.account:
        d.append(f"--account={spec.account}")
    d += [
        f"--output={spec.launch_dir}/%x-%j.out",
        "--open-mode=append",  # a requeued start adds to the same log
        "--requeue",
    ]
    if spec.signal_grace:
        # B: the batch shell alone (the ranks are told through the stop file).
        d.append(f"--signal=B:USR1@{spec.signal_grace}")
    return [f"#SBATCH {item}" for item in d]


def _lsf_directives(spec: LaunchSpec) -> list[str]:
    resources = f"span[ptile={spec.slots_per_node}]"
    if spec.mem:
        resources += f" rusage[mem={spec.mem}]"
    d = [
        f"-J {spec.job_name}",
        f"-n {spec.nodes * spec.slots_per_node}",
        f'-R "{resources}"',
    ]
    if spec.gpus_per_node:
        d.append(f'-gpu "num={spec.gpus_per_node}"')
    if spec.time_s:
        d.append(f"-W {_lsf_minutes(spec.time_s)}")
    if spec.partition:
        d.append(f"-q {spec.partition}")
    if spec.account:
        d.append(f"-P {spec.account}")
    d += [f"-o {spec.launch_dir}/%J.out", "-r"]  # -o without -e: both streams, appended
    if spec.signal_grace:
        # URG: ignored by any process it reaches but the script, which traps it.
        d += ["-wa URG", f"-wt {math.ceil(spec.signal_grace / 60)}"]
    return [f"#BSUB {item}" for item in d]


def _environment(spec: LaunchSpec) -> list[str]:
    """cd, exports and setup lines: the same on the batch host and (LSF) every node."""
    q = shlex.quote
    lines = [f"cd {q(spec.workdir)} || exit 1"]
    if spec.cache:
        lines.append(f"export UMBRELLA_CACHE={q(spec.cache)}")
    lines += [f"export {key}={q(value)}" for key, value in spec.env]
    lines += list(spec.setup)
    return lines


def _slurm_hosts() -> list[str]:
    return [
        'JOB_ID="$SLURM_JOB_ID"',
        'HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        'MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
    ]


def _lsf_hosts() -> list[str]:
    return [
        'JOB_ID="$LSB_JOBID"',
        "# One line per slot in the host file; host, slots, host, slots... in LSB_MCPU_HOSTS.",
        'if [ -n "${LSB_DJOB_HOSTFILE:-}" ] && [ -r "$LSB_DJOB_HOSTFILE" ]; then',
        "    HOSTS=$(awk 'NF && !seen[$1]++ {print $1}' \"$LSB_DJOB_HOSTFILE\")",
        "else",
        "    HOSTS=$(printf '%s\\n' $LSB_MCPU_HOSTS | awk 'NR % 2 == 1 && !seen[$1]++')",
        "fi",
        'MASTER=$(printf "%s\\n" $HOSTS | head -n 1)',
    ]


def _command(spec: LaunchSpec) -> list[str]:
    """``CMD``: the agent, torchrun's rendezvous and the train command of each node."""
    q = shlex.quote
    train = " ".join(q(a) for a in spec.train_args)
    lines = [
        "# Each node: a torchrun agent (umbrella_core.launch agent: torchrun that passes no",
        "# SIGTERM on) starting the node's ranks; the rendezvous is on the first host.",
        "CMD=(",
        '    "$PYTHON" -m umbrella_core.launch agent --stop-file "$STOP_FILE" --chdir '
        + q(spec.workdir)
        + f" --grace {spec.signal_grace or 300} --",
        f"    --nnodes {spec.nodes} --nproc_per_node {spec.nproc}",
        f'    --rdzv_backend c10d --rdzv_endpoint "$MASTER:{spec.port}" --rdzv_id "$JOB_ID"',
        f"    -m umbrella_core.cli {train}",
        ")",
    ]
    if spec.resume == "add":
        lines.append("CMD+=(--resume)  # the latest checkpoint of the run; none yet: a fresh start")
    elif spec.resume == "on-checkpoint":
        lines += [
            "# The checkpoint the train arguments name starts the run; once the run has",
            "# its own, the later --resume wins.",
            'for state in "$RUN_DIR"/checkpoint-*/trainer_state.json; do',
            '    if [ -f "$state" ]; then CMD+=(--resume); break; fi',
            "done",
        ]
    return lines


def _signals(spec: LaunchSpec) -> list[str]:
    warning = "USR1" if spec.scheduler == "slurm" else "URG"
    return [
        "warned=0",
        "stopped=0",
        "on_warning() {",
        "    warned=1",
        '    echo "umbrella launch: run limit near: every rank saves a checkpoint and stops" >&2',
        '    : > "$STOP_FILE"',
        "}",
        "# The scheduler's own SIGTERM reached every rank too: passing it on would be a",
        "# second one, which stops a rank at once, without its checkpoint.",
        "on_term() {",
        "    stopped=1",
        '    echo "umbrella launch: SIGTERM: the ranks save a checkpoint and stop" >&2',
        "}",
        f"trap on_warning {warning}",
        "trap on_term TERM",
    ]


def _wait_function() -> list[str]:
    return [
        "# The exit status of process $1; a trapped signal interrupts `wait`, not the step.",
        "wait_step() {",
        "    local pid=$1 rc again",
        "    while :; do",
        '        wait "$pid"; rc=$?',
        '        if [ "$rc" -le 128 ] || ! kill -0 "$pid" 2>/dev/null; then break; fi',
        "    done",
        '    if [ "$rc" -gt 128 ]; then',
        '        wait "$pid" 2>/dev/null; again=$?',
        '        if [ "$again" -ne 127 ]; then rc=$again; fi',
        "    fi",
        '    return "$rc"',
        "}",
    ]


def _slurm_launch(spec: LaunchSpec) -> list[str]:
    options = [f"--nodes={spec.nodes}", "--ntasks-per-node=1"]
    if spec.cpus_per_gpu:
        # srun does not take --cpus-per-task from sbatch (Slurm 22.05 and later).
        options.append(f"--cpus-per-task={spec.slots_per_node}")
    # Not killing the others when one node's agent exits: rank 0 may still be
    # renaming the checkpoint all ranks have written.
    options.append("--kill-on-bad-exit=0")
    return [
        f'srun {" ".join(options)} "${{CMD[@]}}" &',
        "step=$!",
        'wait_step "$step"; rc=$?',
    ]


def _lsf_launch(spec: LaunchSpec) -> list[str]:
    # blaunch runs its command through a shell on each host: a node script of
    # simple words carries the arguments whole, and the environment.
    return [
        'NODE_SCRIPT="$LAUNCH_DIR/$JOB_ID.node.sh"',
        "{",
        "    cat <<'UMBRELLA_NODE_ENVIRONMENT'",
        "#!/bin/bash",
        *_environment(spec),
        "UMBRELLA_NODE_ENVIRONMENT",
        "    printf 'exec'; printf ' %q' \"${CMD[@]}\"; printf '\\n'",
        '} > "$NODE_SCRIPT"',
        'blaunch -z "$(printf "%s " $HOSTS)" /bin/bash "$NODE_SCRIPT" &',
        "step=$!",
        'wait_step "$step"; rc=$?',
    ]


# -- submitting ----------------------------------------------------------------


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


def _job_id(answer: str) -> str | None:
    found = re.search(r"Submitted batch job (\d+)|Job <(\d+)>", answer)
    return next((g for g in found.groups() if g), None) if found else None


def _cmd_launch(args: argparse.Namespace, *, train_parser: Any) -> int:
    spec = LaunchSpec.from_arguments(args, train_parser)
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
    job = _job_id(answer)
    if job:
        print(f"script: {path}\nlog: {log_path(spec, job)}")
    return 0


def add_launch_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``launch`` subcommand (argparse), added by :func:`umbrella_core.cli.build_parser`.

    Added after ``train``: its parser is the one that checks the train arguments.
    """
    p = sub.add_parser(
        "launch",
        help="run umbrella train as a SLURM or LSF job on many nodes (requeued, resumed)",
        description=(
            "Write a job script that starts one torchrun agent per node (c10d rendezvous "
            "on the first host) running the train command given after --, with --resume, "
            "and submit it (sbatch / bsub), or only write and show it (--dry-run). "
            "--signal-grace seconds before the run limit every rank saves a checkpoint and stops, "
            "and the job is requeued; its next start continues the run. The script and the "
            "logs go in OUTPUT_DIR/launch/."
        ),
        usage="umbrella launch --scheduler slurm|lsf [--nodes N] --gpus-per-node G [options] "
        "-- train [train arguments]",
    )
    p.add_argument("--scheduler", required=True, choices=SCHEDULERS)
    p.add_argument("--nodes", type=int, default=1, help="hosts (default 1)")
    p.add_argument(
        "--gpus-per-node", type=int, required=True, help="GPUs per host; 0: CPU hosts"
    )
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
    p.set_defaults(func=functools.partial(_cmd_launch, train_parser=sub.choices.get("train")))
    return p


# -- on the nodes: the agent and the lock ----------------------------------------


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

    api.PContext.close = patient_close
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
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
    return lock


def _main(argv: Sequence[str]) -> int:
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main(sys.argv[1:]))
