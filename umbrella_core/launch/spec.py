"""What a launched job is: :class:`LaunchSpec`, checked as it is made, and the run limit."""

from __future__ import annotations

import argparse
import copy
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from umbrella_core.errors import ConfigError
from umbrella_core.types._convert import as_tuple

__all__ = ["SCHEDULERS", "RESUME_MODES", "LaunchSpec", "parse_duration"]

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


def _lower(value: str) -> str:
    # str.lower itself: mypy's attrs plugin takes no method as a converter.
    return str.lower(value)


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

    scheduler: str = attrs.field(converter=_lower, validator=_one_of(SCHEDULERS))
    nodes: int = attrs.field(validator=_at_least(1))
    gpus_per_node: int = attrs.field(validator=_at_least(0))
    procs_per_node: int | None = attrs.field(default=None, validator=_at_least(1))
    train_args: tuple[str, ...] = attrs.field(converter=as_tuple, validator=_train_args)
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
    setup: tuple[str, ...] = attrs.field(default=(), converter=as_tuple)
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
