"""The job script of a :class:`LaunchSpec`, for SLURM (``sbatch``) or LSF (``bsub``).

Pure: text from the value. Why the script does what it does (one SIGTERM per
rank, the warning signal, the stop file, the requeue) is in the package's
docstring (umbrella_core/launch/__init__.py).
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from umbrella_core.launch.spec import LaunchSpec

__all__ = ["script_path", "log_path", "render_script"]


def _slurm_time(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    clock = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}-{clock}" if days else clock


def _lsf_minutes(seconds: int) -> str:
    minutes = math.ceil(seconds / 60)
    return f"{minutes // 60}:{minutes % 60:02d}"


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
        "# continues the run from its last checkpoint; see umbrella_core/launch/__init__.py.",
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
        f'    {requeue} || echo "umbrella launch: could not requeue job $JOB_ID; submit '
        f'{script_path(spec)} again to go on" >&2',
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
        f"    -m umbrella_core.commands {train}",
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
