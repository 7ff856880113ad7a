"""Experiment trackers of a run: TensorBoard, MLflow, Weights & Biases (``trainer.report_to``).

Each tracker is transformers' own callback (``TensorBoardCallback``,
``MLflowCallback``, ``WandbCallback``), so whatever the trainer logs through
``Trainer.log`` reaches all of them: the loss, the per-modality losses
(``loss/t1``), the evaluation metrics (``eval_accuracy/t1``). What differs
from transformers' defaults is where they write and what they are told at
the start, because a run must not need a server, an account or a prompt:

* MLflow writes to ``OUTPUT_DIR/mlruns/mlflow.db`` (SQLite; MLflow 3 refuses
  its old file store), artifacts next to it, unless ``MLFLOW_TRACKING_URI`` is
  set. The experiment is ``trainer.experiment`` (else ``MLFLOW_EXPERIMENT_NAME``,
  else the output folder's name), the run is named after the output folder,
  and the run configuration is logged flattened as parameters
  (``trainer.learning_rate``) and whole as ``config.yaml``.
* W&B runs offline into ``OUTPUT_DIR/wandb`` (``wandb sync`` uploads it later)
  unless ``WANDB_MODE`` is set or an API key is at hand (``WANDB_API_KEY`` or
  ``wandb login``'s ``~/.netrc``): it never asks for a login.

Only the main process gets these callbacks (train/run.py), and transformers'
callbacks log only where ``state.is_world_process_zero`` too.

(Since 0.3.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from umbrella_core.errors import ConfigError

__all__ = [
    "check_trackers",
    "tracker_callbacks",
    "finish_trackers",
    "describe_trackers",
    "flatten_params",
    "mlflow_store_uri",
]

#: The modules each tracker needs, and what installs them.
_NEEDS = {
    "tensorboard": (("tensorboard",), "pip install tensorboard"),
    # mlflow-skinny has no SQL store drivers of its own: SQLAlchemy and alembic.
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "pip install 'umbrella-core[mlflow]'"),
    "wandb": (("wandb",), "pip install 'umbrella-core[wandb]'"),
}


def check_trackers(names: Sequence[str]) -> None:
    """Refuse, before anything is built, a tracker whose package is missing (one line)."""
    for name in names:
        modules, install = _NEEDS[name]
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(
                f"trainer.report_to={name}: {', '.join(missing)} is not installed; {install}"
            )


def mlflow_store_uri(out_dir: Path) -> str:
    """The tracking URI of a run: ``MLFLOW_TRACKING_URI``, else the run's own SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{_local_store(out_dir)}"


def _local_store(out_dir: Path) -> Path:
    return Path(out_dir).resolve() / "mlruns" / "mlflow.db"


def flatten_params(config: Mapping[str, Any], max_length: int = 6000) -> dict[str, str]:
    """The run configuration as MLflow parameters: dotted names, string values.

    Lists and empty mappings become JSON; a value over ``max_length``
    characters (MLflow's limit) is cut and ends in ``...`` rather than dropped,
    so every setting still shows (the whole configuration is ``config.yaml``).
    """
    out: dict[str, str] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping) and value:
                walk(value, f"{name}.")
                continue
            if isinstance(value, str):
                text = value
            else:
                text = json.dumps(value, default=str)
            out[name] = text if len(text) <= max_length else text[: max_length - 3] + "..."

    walk(config, "")
    return out


def _callback_classes() -> tuple[type, type]:
    """The two tracker callbacks, made once transformers is imported (it is heavy)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _make_classes()
    return _CLASSES


_CLASSES: tuple[type, type] | None = None
# Runs this process started, so that a run left open by a failed training in
# the same process (tests, notebooks) is ended before the next one starts.
_OPEN_MLFLOW_RUNS: set[str] = set()


def _make_classes() -> tuple[type, type]:
    return _mlflow_callback_class(), _wandb_callback_class()


def _mlflow_experiment_id(mlflow: Any, name: str, out_dir: Path, *, local: bool) -> str:
    """The id of the MLflow experiment ``name``, made when the store has none of that name."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # Left to itself a SQLite store puts artifacts in ./mlruns of
    # whatever folder the run was started from.
    location = (out_dir.resolve() / "mlruns" / "artifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location if local else None)


def _log_mlflow_config(mlflow: Any, config: Mapping[str, Any], batch: int) -> None:
    """Log the run's config: flattened as params, ``batch`` at a time, and as config.yaml."""
    limit = mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
    params = list(flatten_params(config, limit).items())
    for i in range(0, len(params), batch):
        mlflow.log_params(dict(params[i : i + batch]))
    mlflow.log_dict(dict(config), "config.yaml")


def _mlflow_callback_class() -> type:
    """transformers' MLflow callback made ours (a class made here: transformers is heavy)."""
    from transformers.integrations import MLflowCallback

    class UmbrellaMLflowCallback(MLflowCallback):
        """transformers' MLflow callback, started on the run's store with the run's config."""

        def __init__(self, out_dir: Path, config: Mapping[str, Any], experiment: str) -> None:
            super().__init__()
            self.out_dir = Path(out_dir)
            self.config = config
            self.experiment = experiment
            self.tracking_uri = mlflow_store_uri(self.out_dir)
            self.run_id: str | None = None

        def setup(self, args: Any, state: Any, model: Any) -> None:
            mlflow = self._ml_flow
            self._async_log = True  # read by MLflowCallback.on_log
            self._initialized = True
            if not state.is_world_process_zero:
                return
            local = "MLFLOW_TRACKING_URI" not in os.environ
            if local:
                _local_store(self.out_dir).parent.mkdir(parents=True, exist_ok=True)
            # Set every time: a process may train twice, into two output folders.
            mlflow.set_tracking_uri(self.tracking_uri)
            stale = mlflow.active_run()
            if stale is not None and stale.info.run_id in _OPEN_MLFLOW_RUNS:
                mlflow.end_run("FAILED")
            experiment_id = _mlflow_experiment_id(
                mlflow, self.experiment, self.out_dir, local=local
            )
            if mlflow.active_run() is None:
                run = mlflow.start_run(experiment_id=experiment_id, run_name=self.out_dir.name)
                self._auto_end_run = True
                _OPEN_MLFLOW_RUNS.add(run.info.run_id)
            self.run_id = mlflow.active_run().info.run_id
            _log_mlflow_config(mlflow, self.config, self._MAX_PARAMS_TAGS_PER_BATCH)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # The run stays open for the held-out table after training (finish()).
            return

        def finish(self, metrics: Mapping[str, float], step: int) -> None:
            mlflow = self._ml_flow
            if not self._initialized or self.run_id is None:
                return
            if metrics:
                mlflow.log_metrics(dict(metrics), step=step)
            active = mlflow.active_run()
            if self._auto_end_run and active is not None and active.info.run_id == self.run_id:
                mlflow.end_run()  # waits for the metrics logged asynchronously
            _OPEN_MLFLOW_RUNS.discard(self.run_id)

        def describe(self) -> str:
            if self.tracking_uri.startswith("sqlite:///"):
                uri = self.tracking_uri
                return f"mlflow:      {uri}   (mlflow ui --backend-store-uri {uri})"
            return f"mlflow:      run {self.run_id} at {self.tracking_uri}"

    return UmbrellaMLflowCallback


def _wandb_callback_class() -> type:
    """transformers' W&B callback made ours (a class made here: transformers is heavy)."""
    from transformers.integrations import WandbCallback

    class UmbrellaWandbCallback(WandbCallback):
        """transformers' W&B callback, offline into the output folder unless set up for online."""

        def __init__(self, out_dir: Path, config: Mapping[str, Any], project: str) -> None:
            super().__init__()
            self.out_dir = Path(out_dir)
            self.config = config
            self.project = project
            self.mode = wandb_mode()
            self.run_dir: str | None = None

        def setup(self, args: Any, state: Any, model: Any, **kwargs: Any) -> None:
            wandb = self._wandb
            self._initialized = True
            if not state.is_world_process_zero:
                return
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.mode == "offline":
                # The process-wide settings too: W&B's own usage telemetry follows
                # them, not the run's mode, and would otherwise call its server.
                wandb.setup(settings=wandb.Settings(mode="offline"))
            if wandb.run is None:
                wandb.init(
                    project=self.project,
                    name=self.out_dir.name,
                    dir=str(self.out_dir),
                    config=dict(self.config),
                    mode=self.mode,
                    # console="off": our log lines stay ours; no login prompt ever.
                    settings=wandb.Settings(silent=True, console="off"),
                )
            run = wandb.run
            self.run_dir = str(Path(run.dir).parent)
            # As WandbCallback.setup: every curve against the optimizer step.
            run.define_metric("train/global_step")
            run.define_metric("*", step_metric="train/global_step", step_sync=True)
            try:
                run.config["model/num_parameters"] = model.num_parameters()
            except AttributeError:
                pass

        def finish(self, metrics: Mapping[str, float], step: int) -> None:
            from transformers.integrations.integration_utils import rewrite_logs

            run = self._wandb.run
            if not self._initialized or run is None:
                return
            if metrics:
                run.log({**rewrite_logs(dict(metrics)), "train/global_step": step})
            run.finish()

        def describe(self) -> str:
            if self.mode == "offline":
                return f"wandb:       {self.run_dir}   (offline; upload: wandb sync {self.run_dir})"
            return f"wandb:       {self.run_dir}"

    return UmbrellaWandbCallback


def _no_mlflow_telemetry() -> None:
    """Keep MLflow from sending its usage telemetry (it would call its server), unless asked.

    MLflow reads the variable when it is imported and at each event; a client
    made by an earlier import is replaced (by none) before it sends anything.
    """
    if "MLFLOW_DISABLE_TELEMETRY" in os.environ:
        return  # the user's choice
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    if "mlflow" in sys.modules:
        try:
            from mlflow.telemetry.client import set_telemetry_client

            set_telemetry_client()
        except Exception:  # pragma: no cover - an MLflow without telemetry
            pass


def wandb_mode() -> str | None:
    """``offline`` unless the user chose (``WANDB_MODE``) or can log in (an API key at hand).

    Online without a key, W&B would ask for one on a terminal; it never gets
    to: without a key the run stays offline.
    """
    if os.environ.get("WANDB_MODE"):
        return None  # W&B reads it itself
    if os.environ.get("WANDB_API_KEY"):
        return None
    import netrc
    from urllib.parse import urlsplit

    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        if host and netrc.netrc(path).authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def tracker_callbacks(names: Sequence[str], out_dir: Path, config: Any) -> list[Any]:
    """The callbacks of ``trainer.report_to`` for the main process (``config``: a RunConfig)."""
    callbacks: list[Any] = []
    if not names:
        return callbacks
    check_trackers(names)
    # Plain JSON values (tuples as lists): MLflow's config.yaml must load with safe_load.
    settings = json.loads(json.dumps(config.to_dict(), default=str))
    experiment = config.trainer.experiment
    if "tensorboard" in names:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        # One event file, written where the run folder says.
        writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        callbacks.append(TensorBoardCallback(tb_writer=writer))
    mlflow_cls, wandb_cls = _callback_classes()
    if "mlflow" in names:
        _no_mlflow_telemetry()
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or Path(out_dir).name
        callbacks.append(mlflow_cls(out_dir, settings, name))
    if "wandb" in names:
        project = experiment or os.environ.get("WANDB_PROJECT") or Path(out_dir).name
        callbacks.append(wandb_cls(out_dir, settings, project))
    return callbacks


def _trackers(trainer: Any) -> list[Any]:
    if _CLASSES is None:
        return []
    return [c for c in trainer.callback_handler.callbacks if isinstance(c, _CLASSES)]


def finish_trackers(trainer: Any, metrics: Mapping[str, float], step: int) -> None:
    """Log the held-out table's metrics (``test_loss/t1``) and close the MLflow and W&B runs."""
    for callback in _trackers(trainer):
        callback.finish(metrics, step)


def describe_trackers(trainer: Any) -> list[str]:
    """One line per MLflow / W&B run: where it is and how to look at it."""
    return [callback.describe() for callback in _trackers(trainer) if callback._initialized]
