"""``umbrella launch``: the SLURM/LSF job script, its submission, and the script at work.

No scheduler here: ``sbatch``, ``bsub``, ``srun``, ``scontrol``, ``blaunch`` and the
nodes' interpreter are small shell stubs that record what they were given.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from umbrella_core.commands import build_parser, main
from umbrella_core.errors import ConfigError
from umbrella_core.launch import (
    LaunchSpec,
    parse_duration,
    release_stale_lock,
    render_script,
)

# The interpreter of the nodes: records its arguments (NUL-separated) and plays a
# node's agent: exits 143 once the stop file exists (its ranks saved and stopped),
# 143 on SIGTERM, or $AGENT_EXIT at once. release-lock runs for real.
PYTHON_STUB = """#!/bin/bash
if [ "$1 $2 $3" = "-m umbrella_core.launch release-lock" ]; then exec {python} "$@"; fi
for a in "$@"; do printf '%s\\0' "$a"; done > "$RECORD/agent.args"
stop=; prev=
for a in "$@"; do if [ "$prev" = --stop-file ]; then stop=$a; fi; prev=$a; done
trap 'exit 143' TERM
echo $$ > "$RECORD/agent.pid"
end=$((SECONDS + 20))
while [ ! -e "$stop" ]; do
    if [ -n "${{AGENT_EXIT:-}}" ]; then exit "$AGENT_EXIT"; fi
    if [ "$SECONDS" -ge "$end" ]; then exit 99; fi
    sleep 0.05
done
exit 143
"""

STUBS = {
    # Submitters: their argv and standard input, and the scheduler's answer.
    "sbatch": """for a in "$@"; do printf '%s\\0' "$a"; done > "$RECORD/sbatch.args"
if [ -n "${SUBMIT_FAIL:-}" ]; then
    echo "sbatch: error: invalid partition specified: gpux" >&2
    exit 1
fi
echo "Submitted batch job 4242"
""",
    "bsub": """for a in "$@"; do printf '%s\\0' "$a"; done > "$RECORD/bsub.args"
cat > "$RECORD/bsub.stdin"
echo "Job <4242> is submitted to queue <normal>."
""",
    # One node's task, run here: the options go, the command runs.
    "srun": """for a in "$@"; do printf '%s\\0' "$a"; done > "$RECORD/srun.args"
while [ "${1#--}" != "$1" ]; do shift; done
exec "$@"
""",
    "scontrol": """case "$1 $2" in
    "show hostnames") printf 'node1\\nnode2\\n' ;;
    requeue*) echo "$@" >> "$RECORD/requeue" ;;
esac
""",
    "blaunch": """for a in "$@"; do printf '%s\\0' "$a"; done > "$RECORD/blaunch.args"
shift 2
exec "$@"
""",
    "brequeue": """echo "brequeue $*" >> "$RECORD/requeue"
""",
}


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """A folder to launch from (run.yaml in it), stubs on PATH, and what they record."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, body in STUBS.items():
        _executable(bin_dir / name, "#!/bin/bash\n" + body)
    _executable(bin_dir / "python-node", PYTHON_STUB.format(python=shlex.quote(sys.executable)))
    (tmp_path / "run.yaml").write_text("trainer:\n  save_steps: 500\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("RECORD", str(record))
    monkeypatch.delenv("UMBRELLA_CACHE", raising=False)
    monkeypatch.delenv("SUBMIT_FAIL", raising=False)
    return tmp_path


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _args(path: Path) -> list[str]:
    return path.read_bytes().decode().split("\0")[:-1]


def _dry_run(capsys, *launch_args: str, train=("train", "--config", "run.yaml")) -> str:
    """The script ``umbrella launch --dry-run`` writes; checks it is what it printed."""
    assert main(["launch", *launch_args, "--dry-run", "--", *train]) == 0
    out = capsys.readouterr().out
    first, *rest = out.splitlines(keepends=True)
    path = Path(first.removeprefix("script: ").strip())
    text = path.read_text()
    assert "".join(rest).startswith(text)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    return text


def _directives(text: str, prefix: str) -> list[str]:
    return [line[len(prefix) :].strip() for line in text.splitlines() if line.startswith(prefix)]


def _command(text: str) -> list[str]:
    """The words of the script's ``CMD=( ... )`` array, unquoted."""
    body = text.split("CMD=(\n", 1)[1].split("\n)\n", 1)[0]
    return shlex.split(body, comments=True)


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("umbrella: error: ") and err.count("\n") == 1
    return err


# -- the script -----------------------------------------------------------------


def test_slurm_script_asks_for_the_nodes_and_starts_one_torchrun_per_node(cluster, capsys):
    text = _dry_run(
        capsys,
        *("--scheduler", "slurm", "--nodes", "2", "--gpus-per-node", "8"),
        *("--time", "24:00:00", "--partition", "gpu", "--account", "brain"),
        *("--cpus-per-gpu", "8", "--mem", "480G", "--job-name", "t1-dmri"),
        *("--cache", "/shared/cache", "--env", "NCCL_DEBUG=WARN", "--env", "NOTE=a b $HOME"),
        *("--setup", "module load cuda/12.4", "--python", "/opt/env/bin/python"),
        train=("train", "--config", "run.yaml", "--set", "trainer.experiment=two words"),
    )
    launch = cluster / "runs" / "umbrella" / "launch"
    assert _directives(text, "#SBATCH") == [
        "--job-name=t1-dmri",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--cpus-per-task=64",
        "--mem=480G",
        "--time=1-00:00:00",
        "--partition=gpu",
        "--account=brain",
        f"--output={launch}/%x-%j.out",
        "--open-mode=append",
        "--requeue",
        "--signal=B:USR1@300",
    ]
    lines = text.splitlines()
    assert f"cd {cluster}" in "\n".join(lines)
    assert "export UMBRELLA_CACHE=/shared/cache" in lines
    assert "export NOTE='a b $HOME'" in lines and "module load cuda/12.4" in lines
    assert "PYTHON=/opt/env/bin/python" in lines
    assert 'MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
    assert _command(text) == [
        "$PYTHON", "-m", "umbrella_core.launch", "agent", "--stop-file", "$STOP_FILE",
        "--chdir", str(cluster), "--grace", "300", "--",
        "--nnodes", "2", "--nproc_per_node", "8",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "$MASTER:29500", "--rdzv_id", "$JOB_ID",
        "-m", "umbrella_core.commands", "train", "--config", "run.yaml",
        "--set", "trainer.experiment=two words",
    ]  # fmt: skip
    assert "CMD+=(--resume)" in text
    srun = next(line for line in lines if line.startswith("srun "))
    assert srun == (
        'srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=64 --kill-on-bad-exit=0 "${CMD[@]}" &'
    )
    assert "trap on_warning USR1" in lines and "trap on_term TERM" in lines
    assert 'scontrol requeue "$JOB_ID"' in text


def test_lsf_script_asks_for_slots_per_host_and_warns_before_the_run_limit(cluster, capsys):
    text = _dry_run(
        capsys,
        *("--scheduler", "lsf", "--nodes", "2", "--gpus-per-node", "4"),
        *("--time", "90", "--queue", "gpu", "--project", "brain", "--cpus-per-gpu", "6"),
        *("--mem", "8000", "--signal-grace", "270"),
    )
    launch = cluster / "runs" / "umbrella" / "launch"
    assert _directives(text, "#BSUB") == [
        "-J umbrella",
        "-n 48",
        '-R "span[ptile=24] rusage[mem=8000]"',
        '-gpu "num=4"',
        "-W 1:30",
        "-q gpu",
        "-P brain",
        f"-o {launch}/%J.out",
        "-r",
        "-wa URG",
        "-wt 5",
    ]
    assert "LSB_DJOB_HOSTFILE" in text and "LSB_MCPU_HOSTS" in text
    assert 'blaunch -z "$(printf "%s " $HOSTS)" /bin/bash "$NODE_SCRIPT" &' in text
    assert "trap on_warning URG" in text and 'brequeue "$JOB_ID"' in text
    assert _command(text)[11:15] == ["--nnodes", "2", "--nproc_per_node", "4"]


def test_cpu_nodes_run_one_rank_each_or_the_procs_asked_for(cluster, capsys):
    text = _dry_run(capsys, "--scheduler", "slurm", "--nodes", "3", "--gpus-per-node", "0")
    assert not any("gpus" in d for d in _directives(text, "#SBATCH"))
    assert _command(text)[11:15] == ["--nnodes", "3", "--nproc_per_node", "1"]
    text = _dry_run(capsys, "--scheduler", "lsf", "--gpus-per-node", "0", "--procs-per-node", "4")
    assert "-n 4" in _directives(text, "#BSUB") and '-R "span[ptile=4]"' in text
    assert _command(text)[11:15] == ["--nnodes", "1", "--nproc_per_node", "4"]


def test_the_train_arguments_after_the_double_dash_pass_through_whole(cluster, capsys):
    parser = build_parser()
    train = ["train", "--config", "run.yaml", "--set", "a=b", "--nodes", "9", "--", "x"]
    for argv in (
        ["launch", "--scheduler", "slurm", "--gpus-per-node", "1", "--", *train],
        ["launch", "--scheduler", "slurm", "--gpus-per-node", "1", *train],
    ):
        args = parser.parse_args(argv)
        assert args.nodes == 1 and args.train_args[-len(train) :] == train
    train = ["train", "--config", "run.yaml", "--set", "trainer.experiment=a b", "--seed", "3"]
    text = _dry_run(capsys, "--scheduler", "slurm", "--gpus-per-node", "1", train=train)
    assert _command(text)[-len(train) :] == train


# -- where things go, and resuming ----------------------------------------------------


@pytest.mark.parametrize(
    ("train", "config", "run_dir"),
    [
        (("train",), "", "runs/umbrella"),
        (("train", "--config", "run.yaml"), "trainer:\n  output_dir: from-config\n", "from-config"),
        (("train", "--config", "run.yaml", "--set", "trainer.output_dir=set"), "", "set"),
        (("train", "--set", "trainer.output_dir=set", "--output-dir", "flag"), "", "flag"),
    ],
)
def test_the_logs_go_in_the_runs_output_folder(cluster, capsys, train, config, run_dir):
    (cluster / "run.yaml").write_text(config)
    text = _dry_run(capsys, "--scheduler", "slurm", "--gpus-per-node", "1", train=train)
    assert f"RUN_DIR={cluster / run_dir}" in text.splitlines()
    assert f"LAUNCH_DIR={cluster / run_dir / 'launch'}" in text.splitlines()
    assert (cluster / run_dir / "launch" / "umbrella.sbatch").is_file()


def test_launch_output_dir_and_cache_default_to_the_environment(cluster, capsys, monkeypatch):
    monkeypatch.setenv("UMBRELLA_CACHE", str(cluster / "cache"))
    text = _dry_run(capsys, "--scheduler", "slurm", "--gpus-per-node", "1", "--output-dir", "logs")
    assert f"LAUNCH_DIR={cluster / 'logs' / 'launch'}" in text.splitlines()
    assert f"RUN_DIR={cluster / 'runs' / 'umbrella'}" in text.splitlines()
    assert f"export UMBRELLA_CACHE={cluster / 'cache'}" in text.splitlines()


@pytest.mark.parametrize(
    ("extra", "config", "resume"),
    [
        ((), "", "CMD+=(--resume)"),
        (("--resume",), "", None),
        (("--set", "trainer.resume=auto"), "", None),
        ((), "trainer:\n  resume: auto\n", None),
        (("--resume", "elsewhere/checkpoint-10"), "", "for state in"),
        ((), "trainer:\n  resume: elsewhere/checkpoint-10\n", "for state in"),
    ],
)
def test_resume_is_added_unless_the_train_arguments_say_it(cluster, capsys, extra, config, resume):
    (cluster / "run.yaml").write_text(config)
    train = ("train", "--config", "run.yaml", *extra)
    text = _dry_run(capsys, "--scheduler", "slurm", "--gpus-per-node", "1", train=train)
    assert _command(text)[-len(extra) or len(_command(text)) :] == list(extra)
    if resume is None:
        assert "CMD+=" not in text
    else:
        assert resume in text
    text = _dry_run(capsys, "--scheduler", "slurm", "--gpus-per-node", "1", "--no-resume")
    assert "CMD+=" not in text


def test_overwrite_in_a_requeued_job_is_refused(cluster, capsys):
    err = _error(
        capsys,
        ["launch", "--scheduler", "slurm", "--gpus-per-node", "1", "--dry-run", "--",
         "train", "--overwrite"],
    )  # fmt: skip
    assert "--overwrite" in err and "--no-resume" in err


# -- refusals ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("launch", "train", "expected"),
    [
        (["--nodes", "0"], ["train"], "--nodes: 0: expected >= 1"),
        (["--gpus-per-node", "-1"], ["train"], "--gpus-per-node: -1: expected >= 0"),
        (["--port", "70000"], ["train"], "--port: 70000: expected 1 to 65535"),
        (["--time", "0"], ["train"], "--time: 0: expected >= 60"),
        ([], ["validate", "x"], "only train is launched"),
        ([], [], "only train is launched"),
        ([], ["train", "--time", "5"], "the train arguments after --: unrecognized arguments"),
        (["--time", "1:30"], ["train"], "--time 1:30: expected minutes"),
        (["--time", "4", "--signal-grace", "300"], ["train"], "not shorter than --time"),
        (["--env", "1X=2"], ["train"], "is not a variable name"),
        (["--env", "X"], ["train"], "expected NAME=VALUE"),
        (["--partition", "a b"], ["train"], "--partition: 'a b' is not one word"),
        ([], ["train", "--config", "missing.yaml"], "missing.yaml: cannot read"),
    ],
)
def test_bad_launches_are_one_line(cluster, capsys, launch, train, expected):
    argv = ["launch", "--scheduler", "slurm", "--gpus-per-node", "1", *launch, "--dry-run"]
    err = _error(capsys, [*argv, "--", *train] if train else argv)
    assert expected in err


def test_durations():
    assert parse_duration("90") == 5400
    assert parse_duration("24:00:00") == 86400
    assert parse_duration("2-01:02:03") == 2 * 86400 + 3723
    with pytest.raises(ConfigError):
        parse_duration("1:75:00")


# -- submitting ------------------------------------------------------------------------


def test_sbatch_gets_the_script_and_its_job_id_is_printed(cluster, capsys):
    argv = ["launch", "--scheduler", "slurm", "--nodes", "2", "--gpus-per-node", "8"]
    assert main([*argv, "--", "train", "--config", "run.yaml"]) == 0
    out = capsys.readouterr().out
    script = cluster / "runs" / "umbrella" / "launch" / "umbrella.sbatch"
    assert _args(cluster / "record" / "sbatch.args") == [str(script)]
    assert out.splitlines() == [
        "Submitted batch job 4242",
        f"script: {script}",
        f"log: {script.parent / 'umbrella-4242.out'}",
    ]


def test_bsub_reads_the_script_on_its_standard_input(cluster, capsys):
    argv = ["launch", "--scheduler", "lsf", "--nodes", "2", "--gpus-per-node", "8"]
    assert main([*argv, "--", "train"]) == 0
    out = capsys.readouterr().out
    script = cluster / "runs" / "umbrella" / "launch" / "umbrella.bsub"
    assert _args(cluster / "record" / "bsub.args") == []
    assert (cluster / "record" / "bsub.stdin").read_text() == script.read_text()
    assert out.splitlines()[0] == "Job <4242> is submitted to queue <normal>."
    assert out.splitlines()[-1] == f"log: {script.parent / '4242.out'}"


def test_no_sbatch_on_path_says_so_and_offers_dry_run(cluster, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(cluster / "empty"))
    err = _error(capsys, ["launch", "--scheduler", "slurm", "--gpus-per-node", "1", "--", "train"])
    assert "sbatch not found on PATH" in err and "--dry-run" in err
    err = _error(capsys, ["launch", "--scheduler", "lsf", "--gpus-per-node", "1", "--", "train"])
    assert "bsub not found on PATH" in err


def test_a_refused_submission_is_an_error_with_the_schedulers_words(cluster, capsys, monkeypatch):
    monkeypatch.setenv("SUBMIT_FAIL", "1")
    err = _error(capsys, ["launch", "--scheduler", "slurm", "--gpus-per-node", "1", "--", "train"])
    assert "failed (exit 1): sbatch: error: invalid partition specified: gpux" in err


# -- the script at work -----------------------------------------------------------------


def _launch_script(cluster, capsys, scheduler: str, *train: str) -> Path:
    argv = ["launch", "--scheduler", scheduler, "--nodes", "2", "--gpus-per-node", "2"]
    argv += ["--python", str(cluster / "bin" / "python-node"), "--env", "SEEN=yes"]
    out_dir = str(cluster / "run")
    assert main([*argv, "--dry-run", "--", "train", "--output-dir", out_dir, *train]) == 0
    capsys.readouterr()
    return cluster / "run" / "launch" / f"umbrella.{'sbatch' if scheduler == 'slurm' else 'bsub'}"


def _start(script: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(script)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(path: Path, job: subprocess.Popen) -> None:
    deadline = time.monotonic() + 15
    while not path.exists():
        assert job.poll() is None, job.communicate()[0]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    time.sleep(0.2)  # the script is in its wait (its traps are set before the step starts)


SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2"}


def test_slurm_warning_stops_every_rank_through_the_stop_file_and_requeues(cluster, capsys):
    script = _launch_script(cluster, capsys, "slurm")
    record = cluster / "record"
    # A lock of this job's previous start, on a host lost since: it goes.
    launch = cluster / "run" / "launch"
    launch.mkdir(parents=True, exist_ok=True)
    (launch / "4242.hosts").write_text("node1\nnode3\n")
    os.utime(launch / "4242.hosts", (time.time() - 3600, time.time() - 3600))
    lock = {"pid": 1, "host": "node3", "started": _stamp(time.time() - 1800)}
    (cluster / "run" / "umbrella.lock").write_text(json.dumps(lock))

    job = _start(script, SLURM_ENV)
    _wait_for(record / "agent.pid", job)
    job.send_signal(signal.SIGUSR1)  # sbatch --signal=B:USR1@300
    out = job.communicate(timeout=20)[0]

    assert job.returncode == 143, out
    assert (record / "requeue").read_text() == "requeue 4242\n"
    assert (launch / "stop-4242").exists() and "requeueing job 4242" in out
    assert not (cluster / "run" / "umbrella.lock").exists()
    assert (launch / "4242.hosts").read_text() == "node1\nnode2\n"
    srun = _args(record / "srun.args")
    assert srun[:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=0"]
    assert _args(record / "agent.args") == [
        "-m", "umbrella_core.launch", "agent", "--stop-file", str(launch / "stop-4242"),
        "--chdir", str(cluster), "--grace", "300", "--",
        "--nnodes", "2", "--nproc_per_node", "2",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "node1:29500", "--rdzv_id", "4242",
        "-m", "umbrella_core.commands", "train", "--output-dir", str(cluster / "run"), "--resume",
    ]  # fmt: skip


def test_the_schedulers_sigterm_is_not_passed_on_and_does_not_requeue(cluster, capsys):
    script = _launch_script(cluster, capsys, "slurm")
    record = cluster / "record"
    job = _start(script, SLURM_ENV)
    _wait_for(record / "agent.pid", job)
    # scancel / preemption: slurmstepd signals the step's processes and the batch shell.
    job.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert job.poll() is None  # still waiting for the ranks to save
    os.kill(int((record / "agent.pid").read_text()), signal.SIGTERM)
    out = job.communicate(timeout=20)[0]
    assert job.returncode == 143, out
    assert not (cluster / "run" / "launch" / "stop-4242").exists()
    assert not (record / "requeue").exists()


def test_a_run_that_ends_is_not_requeued_and_a_later_start_resumes_its_own_checkpoint(
    cluster, capsys
):
    script = _launch_script(cluster, capsys, "slurm", "--resume", "other/checkpoint-7")
    record = cluster / "record"
    job = _start(script, {**SLURM_ENV, "AGENT_EXIT": "0"})
    assert job.communicate(timeout=20)[0] is not None and job.returncode == 0
    assert _args(record / "agent.args")[-2:] == ["--resume", "other/checkpoint-7"]
    assert not (record / "requeue").exists()
    # Requeued after a checkpoint of its own: the later --resume (auto) wins.
    (cluster / "run" / "checkpoint-500").mkdir(parents=True)
    (cluster / "run" / "checkpoint-500" / "trainer_state.json").write_text("{}")
    job = _start(script, {**SLURM_ENV, "AGENT_EXIT": "0"})
    job.communicate(timeout=20)
    assert _args(record / "agent.args")[-3:] == ["--resume", "other/checkpoint-7", "--resume"]


def test_lsf_script_finds_the_hosts_and_runs_the_node_script_through_blaunch(cluster, capsys):
    script = _launch_script(cluster, capsys, "lsf")
    record = cluster / "record"
    hostfile = cluster / "hostfile"
    hostfile.write_text("hostA\nhostA\nhostB\nhostB\n")
    job = _start(script, {"LSB_JOBID": "4242", "LSB_DJOB_HOSTFILE": str(hostfile)})
    _wait_for(record / "agent.pid", job)
    job.send_signal(signal.SIGURG)  # bsub -wa URG
    out = job.communicate(timeout=20)[0]
    assert job.returncode == 143, out
    assert (record / "requeue").read_text() == "brequeue 4242\n"
    node_script = cluster / "run" / "launch" / "4242.node.sh"
    assert _args(record / "blaunch.args") == ["-z", "hostA hostB ", "/bin/bash", str(node_script)]
    lines = node_script.read_text().splitlines()
    assert lines[:3] == ["#!/bin/bash", f"cd {cluster} || exit 1", "export SEEN=yes"]
    assert lines[-1].startswith("exec ")
    agent = _args(record / "agent.args")
    assert agent[agent.index("--rdzv_endpoint") + 1] == "hostA:29500"
    assert agent[agent.index("--rdzv_id") + 1] == "4242" and agent[-1] == "--resume"

    # Without the host file: LSB_MCPU_HOSTS ("host slots host slots").
    env = {"LSB_JOBID": "77", "LSB_MCPU_HOSTS": "hostC 8 hostD 8", "AGENT_EXIT": "0"}
    job = _start(script, env)
    assert job.communicate(timeout=20) and job.returncode == 0
    agent = _args(record / "agent.args")
    assert agent[agent.index("--rdzv_endpoint") + 1] == "hostC:29500"
    # A job on other hosts than it asked for stops before starting anything.
    job = _start(script, {"LSB_JOBID": "78", "LSB_MCPU_HOSTS": "hostC 8", "AGENT_EXIT": "0"})
    out = job.communicate(timeout=20)[0]
    assert job.returncode == 1 and "expected 2 host(s)" in out


def _stamp(when: float) -> str:
    return datetime.fromtimestamp(when).astimezone().strftime("%Y-%m-%dT%H:%M:%S%z")


def test_only_a_lock_of_this_jobs_previous_hosts_is_released(tmp_path):
    hosts = tmp_path / "9.hosts"
    hosts.write_text("n1\nn2\n")
    os.utime(hosts, (time.time() - 600, time.time() - 600))
    lock = tmp_path / "umbrella.lock"
    for held, released in [
        ({"pid": 5, "host": "n2", "started": _stamp(time.time() - 300)}, True),
        ({"pid": 5, "host": "n9", "started": _stamp(time.time() - 300)}, False),  # another host
        ({"pid": 5, "host": "n1", "started": _stamp(time.time() - 7200)}, False),  # before it
    ]:
        lock.write_text(json.dumps(held))
        assert (release_stale_lock(tmp_path, hosts) is not None) is released
        assert lock.exists() is not released
    assert release_stale_lock(tmp_path, tmp_path / "none.hosts") is None  # a first start


def test_the_lock_of_a_live_process_of_this_host_is_never_released(tmp_path):
    import socket
    import subprocess
    import sys

    hosts = tmp_path / "9.hosts"
    hosts.write_text(f"{socket.gethostname()}\n")
    os.utime(hosts, (time.time() - 600, time.time() - 600))
    lock = tmp_path / "umbrella.lock"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        held = {"pid": live.pid, "host": socket.gethostname(), "started": _stamp(time.time())}
        lock.write_text(json.dumps(held))
        assert release_stale_lock(tmp_path, hosts) is None and lock.exists()
    finally:
        live.kill()
        live.wait()
    assert release_stale_lock(tmp_path, hosts) == lock and not lock.exists()  # now stale


def test_rendering_is_pure(tmp_path):
    spec = LaunchSpec(
        scheduler="SLURM",
        nodes=1,
        gpus_per_node=1,
        train_args=["train"],
        run_dir=str(tmp_path / "run"),
        launch_dir=str(tmp_path / "run" / "launch"),
        workdir=str(tmp_path),
        python=sys.executable,
        signal_grace=0,
    )
    assert spec.scheduler == "slurm" and render_script(spec) == render_script(spec)
    assert "--signal" not in render_script(spec) and not (tmp_path / "run").exists()


# -- the agent: torchrun that leaves SIGTERM to the scheduler ---------------------------

# A rank: notes each SIGTERM; the second local rank takes 2.5 s more to "save",
# so that torchrun has ended the first when it is still at it.
WORKER = """
import os, signal, sys, time
rank = int(os.environ["LOCAL_RANK"])
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(1))
open(os.path.join(sys.argv[1], f"ready{rank}"), "w").close()
end = time.time() + 30
while time.time() < end:
    if got:
        time.sleep(0.5 + 2.5 * rank)  # a second SIGTERM would come in this time
        break
    time.sleep(0.05)
open(os.path.join(sys.argv[1], f"terms{rank}"), "w").write(str(len(got)))
sys.exit(143 if got else 0)
"""


@pytest.mark.slow
def test_the_agent_passes_no_sigterm_on_and_stops_its_ranks_once_on_the_stop_file(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = subprocess.Popen(
        [sys.executable, "-m", "umbrella_core.launch", "agent", "--stop-file",
         str(tmp_path / "stop"), "--chdir", str(tmp_path), "--grace", "20", "--",
         "--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
         "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "t", "worker.py", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{rank}").exists() for rank in (0, 1)):
        assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()[0]
        time.sleep(0.05)
    agent.send_signal(signal.SIGTERM)  # the scheduler's (it reached the ranks as well)
    time.sleep(0.5)
    assert agent.poll() is None
    (tmp_path / "stop").touch()
    out = agent.communicate(timeout=60)[0]
    assert agent.returncode == 143, out  # every rank stopped on SIGTERM
    # Exactly one SIGTERM each, the stop file's: none from the agent, on its SIGTERM
    # or when the first rank ended.
    assert [(tmp_path / f"terms{rank}").read_text() for rank in (0, 1)] == ["1", "1"], out
    assert "not passed on" in out
