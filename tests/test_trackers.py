"""``trainer.report_to``: MLflow and W&B get the losses, the evaluation metrics and the config.

One short demo run reports to both at once (no TensorBoard); the tests read
back what each tracker stored: MLflow through its client on the run's SQLite
store, W&B by parsing the offline run file.
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import pytest
import yaml

from umbrella_core.config import load_config
from umbrella_core.errors import ConfigError
from umbrella_core.plugins import get_plugin_manager

pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")
pytest.importorskip("wandb")

SMALL = [
    "data.modalities=[t1, dmri]",
    "data.demo_subjects=11",
    "data.geometry={t1: {shape: [16, 16, 16], patch_size: [8, 8, 8]}, "
    "dmri: {shape: [16, 16, 16], patch_size: [8, 8, 8]}}",
    "trainer.batch_size=4",
    "trainer.logging_steps=4",
    "trainer.progress=false",
    "trainer.max_steps=8",
    "trainer.eval_strategy=steps",
    "trainer.eval_steps=4",
    "trainer.generate_samples=0",
]


def _offline_env(mp: pytest.MonkeyPatch, home: Path) -> None:
    """No tracking server, no W&B account, nothing written outside ``home``."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        mp.delenv(name, raising=False)
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_DIR", "WANDB_BASE_URL"):
        mp.delenv(name, raising=False)
    mp.setenv("NETRC", str(home / "no-netrc"))
    mp.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
    mp.setenv("WANDB_CACHE_DIR", str(home / "wandb-cache"))
    mp.setenv("WANDB_DATA_DIR", str(home / "wandb-data"))
    mp.setenv("UMBRELLA_CACHE", str(home / "cache"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """8 steps, evaluated at steps 4 and 8, reported to MLflow and W&B only."""
    from umbrella_core.train.run import train

    home = tmp_path_factory.mktemp("trackers")
    out = home / "brain-run"
    lines: list[str] = []
    lookups: list[str] = []
    real_lookup = socket.getaddrinfo

    def lookup(host, *args, **kwargs):
        if host not in ("localhost", "127.0.0.1", "::1"):
            lookups.append(host)
        return real_lookup(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        _offline_env(mp, home)
        mp.setattr(socket, "getaddrinfo", lookup)
        config = load_config(
            None,
            [*SMALL, f"trainer.output_dir={out}", "trainer.report_to=mlflow, wandb"],
        )
        metrics = train(config, get_plugin_manager(), log=lines.append)
    # Neither tracker may reach for a server (W&B's usage telemetry once did).
    assert lookups == []
    return out, config, metrics, lines


@pytest.mark.slow
def test_mlflow_run_in_the_output_folder_holds_losses_metrics_and_config(run):
    from mlflow.tracking import MlflowClient

    out, config, metrics, lines = run
    uri = f"sqlite:///{out.resolve() / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("brain-run")
    assert experiment is not None, "the experiment is named after the output folder"
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "brain-run"
    assert found.info.status == "FINISHED"
    run_id = found.info.run_id

    per_modality = client.get_metric_history(run_id, "loss/t1")
    assert [m.step for m in per_modality] == [4, 8]
    assert all(m.value > 0 for m in per_modality)
    assert [m.step for m in client.get_metric_history(run_id, "loss/dmri")] == [4, 8]
    assert [m.step for m in client.get_metric_history(run_id, "eval_loss/t1")] == [4, 8]
    accuracy = client.get_metric_history(run_id, "eval_accuracy")
    assert [m.step for m in accuracy] == [4, 8]
    assert all(0.0 <= m.value <= 1.0 for m in accuracy)
    # The held-out table after training, as umbrella train prints it.
    (test_loss,) = client.get_metric_history(run_id, "test_loss/t1")
    assert test_loss.value == pytest.approx(metrics["held_out"]["t1"]["loss"])

    params = found.data.params
    assert params["trainer.max_steps"] == "8"
    assert params["trainer.report_to"] == '["mlflow", "wandb"]'
    assert json.loads(params["data.modalities"]) == ["t1", "dmri"]
    assert params["model.base"] == "tiny"

    # Artifacts inside the output folder too, not in ./mlruns of the caller.
    saved = client.download_artifacts(run_id, "config.yaml", str(out / "download"))
    assert Path(saved).resolve().is_relative_to(out.resolve())
    assert yaml.safe_load(Path(saved).read_text())["trainer"]["max_steps"] == 8
    assert (out / "mlruns" / "artifacts").is_dir()
    assert any("mlflow ui --backend-store-uri" in line for line in lines)


def _wandb_records(path: Path):
    """The records of a W&B run file (a LevelDB-style log of protobuf records).

    Blocks of 32 KiB after a 7-byte file header; each chunk has a 7-byte
    header (CRC, length, type: 1 whole, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # padding at the end of a block
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


@pytest.mark.slow
def test_wandb_offline_run_in_the_output_folder_holds_losses_metrics_and_config(run):
    out, config, metrics, lines = run
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history: list[dict[str, float]] = []
    settings: dict[str, object] = {}
    name = project = ""
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name, project = record.run.display_name, record.run.project
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        elif kind == "history":
            row = {
                item.key or "/".join(item.nested_key): item.value_json
                for item in record.history.item
            }
            history.append({k: json.loads(v) for k, v in row.items()})
            continue
        else:
            continue
        settings.update({u.key: json.loads(u.value_json) for u in updates})
    assert (name, project) == ("brain-run", "brain-run")
    assert settings["trainer"]["max_steps"] == 8
    assert settings["data"]["modalities"] == ["t1", "dmri"]

    def steps(key: str) -> list[int]:
        return [row["train/global_step"] for row in history if key in row]

    assert steps("train/loss/t1") == [4, 8]
    assert steps("train/loss/dmri") == [4, 8]
    assert steps("eval/loss/t1") == [4, 8]
    assert steps("eval/accuracy") == [4, 8]
    (test_row,) = [row for row in history if "test/loss/t1" in row]
    assert test_row["test/loss/t1"] == pytest.approx(metrics["held_out"]["t1"]["loss"])
    assert any(f"wandb sync {run_file.parent}" in line for line in lines)


@pytest.mark.slow
def test_trackers_other_than_tensorboard_leave_no_event_files(run):
    out, *_ = run
    assert not (out / "tensorboard").exists()
    assert not any("tensorboard --logdir" in line for line in run[3])


def test_report_to_takes_a_list_or_a_comma_string_and_refuses_unknown_names():
    assert load_config().trainer.report_to == ("tensorboard",)
    config = load_config(None, ["trainer.report_to=TensorBoard,mlflow"])
    assert config.trainer.report_to == ("tensorboard", "mlflow")
    assert load_config(None, ["trainer.report_to=[wandb]"]).trainer.report_to == ("wandb",)
    assert load_config(None, ["trainer.report_to=none"]).trainer.report_to == ()
    with pytest.raises(ConfigError, match=r"trainer\.report_to: unknown tracker 'comet'") as err:
        load_config(None, ["trainer.report_to=tensorboard,comet"])
    assert "tensorboard, mlflow, wandb" in str(err.value)


def test_a_tracker_not_installed_stops_the_run_naming_the_extra(tmp_path, monkeypatch):
    import importlib.util

    from umbrella_core.train.arguments import training_arguments

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    config = load_config(None, [f"trainer.output_dir={tmp_path}", "trainer.report_to=wandb"])
    with pytest.raises(ConfigError) as err:
        training_arguments(config, tmp_path)
    assert str(err.value) == (
        "trainer.report_to=wandb: wandb is not installed; pip install 'umbrella-core[wandb]'"
    )
    assert not list(tmp_path.iterdir())


def test_wandb_stays_offline_unless_the_user_set_it_up(tmp_path, monkeypatch):
    from umbrella_core.train.trackers import wandb_mode

    _offline_env(monkeypatch, tmp_path)
    assert wandb_mode() == "offline"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode() is None, "logged in with wandb login: W&B's own default"
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode() is None
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() is None, "WANDB_MODE is the user's: W&B reads it itself"


def test_mlflow_store_is_the_users_when_set_and_long_settings_are_cut(tmp_path, monkeypatch):
    from umbrella_core.train.trackers import flatten_params, mlflow_store_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_store_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert mlflow_store_uri(tmp_path) == "http://mlflow.example:5000"

    params = flatten_params({"a": {"b": "x" * 50, "c": [1, 2], "d": {}}, "e": None}, 20)
    assert params == {"a.b": "x" * 17 + "...", "a.c": "[1, 2]", "a.d": "{}", "e": "null"}
