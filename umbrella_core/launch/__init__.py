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

from umbrella_core.launch.agent import forward_stop_file, release_stale_lock
from umbrella_core.launch.scripts import log_path, render_script, script_path
from umbrella_core.launch.spec import RESUME_MODES, SCHEDULERS, LaunchSpec, parse_duration
from umbrella_core.launch.submit import submit, submit_command

__all__ = [
    "SCHEDULERS",
    "RESUME_MODES",
    "LaunchSpec",
    "parse_duration",
    "render_script",
    "script_path",
    "log_path",
    "submit_command",
    "submit",
    "forward_stop_file",
    "release_stale_lock",
]
