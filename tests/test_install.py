"""Installing and uninstalling plugin distributions for real, with pip.

A scratch virtual environment sees the test environment's third-party
packages (torch, transformers, ...) through a filtered mirror of its
site-packages that leaves out every UMBRELLA distribution; the UMBRELLA
distributions are then installed into it with pip, as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.install]


def _is_umbrella(name: str) -> bool:
    lowered = name.lower().replace("-", "_")
    return "umbrella" in lowered


@pytest.fixture(scope="module")
def scratch_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("env")
    mirror = base / "mirror"
    mirror.mkdir()
    site_packages = Path(sysconfig.get_paths()["purelib"])
    for entry in site_packages.iterdir():
        if not _is_umbrella(entry.name) and entry.suffix != ".pth":
            (mirror / entry.name).symlink_to(entry)
    env_dir = base / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    child_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(child_site) / "_umbrella_test_mirror.pth").write_text(
        f"import site; site.addsitedir({str(mirror)!r})\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    environ["UMBRELLA_CACHE"] = str(base / "cache")
    environ["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{environ.get('PATH', '')}"

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), cwd=base, env=environ, capture_output=True, text=True)
        if check and result.returncode:
            raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def pip(*args: str) -> None:
        run(str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args)

    pip("install", "--no-deps", "-e", str(ROOT))
    return run, pip, env_dir / "bin" / "umbrella", base


def _modalities(run, umbrella) -> dict:
    payload = json.loads(run(str(umbrella), "plugins", "--json").stdout)
    return {m["name"]: m for m in payload["modalities"]}


def _train(run, umbrella, base, modalities: str) -> subprocess.CompletedProcess:
    return run(
        str(umbrella),
        "train",
        "--modalities",
        modalities,
        "--max-steps",
        "2",
        "--demo-subjects",
        "6",
        "--batch-size",
        "2",
        "--no-progress",
        "--output-dir",
        str(base / f"run-{modalities.replace(',', '-')}"),
    )


def test_install_uninstall_reinstall_a_modality_plugin(scratch_env):
    run, pip, umbrella, base = scratch_env
    assert _modalities(run, umbrella) == {}  # core alone: no modality yet

    pip(
        "install",
        "--no-deps",
        "-e",
        str(ROOT / "plugins/umbrella_t1"),
        "-e",
        str(ROOT / "plugins/umbrella_fmri"),
        "-e",
        str(ROOT / "plugins/umbrella_dmri"),
    )
    found = _modalities(run, umbrella)
    assert set(found) == {"t1", "fmri", "dmri"}
    assert {m["distribution"] for m in found.values()} == {
        "umbrella-t1",
        "umbrella-fmri",
        "umbrella-dmri",
    }
    for name, entry in found.items():
        # The version each plugin's own pyproject.toml declares.
        pyproject = (ROOT / f"plugins/umbrella_{name}/pyproject.toml").read_text()
        assert f'\nversion = "{entry["version"]}"\n' in pyproject

    pip("uninstall", "-y", "umbrella-fmri")
    assert set(_modalities(run, umbrella)) == {"t1", "dmri"}
    trained = _train(run, umbrella, base, "t1,dmri")
    assert "checkpoint:" in trained.stdout
    refused = run(str(umbrella), "train", "--modalities", "t1,fmri", check=False)
    assert refused.returncode == 2 and "unknown modality 'fmri'" in refused.stderr

    pip("install", "--no-deps", "-e", str(ROOT / "plugins/umbrella_fmri"))
    assert set(_modalities(run, umbrella)) == {"t1", "fmri", "dmri"}
    trained = _train(run, umbrella, base, "t1,fmri,dmri")
    fmri = tomllib.loads((ROOT / "plugins/umbrella_fmri/pyproject.toml").read_text())
    assert f"umbrella-fmri {fmri['project']['version']}" in trained.stdout
    assert "checkpoint:" in trained.stdout
