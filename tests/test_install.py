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


def _fake_core_wheel(folder: Path, version: str) -> Path:
    """A wheel of an ``umbrella-core`` at ``version`` holding nothing: what an index would
    offer of an old release."""
    import base64
    import hashlib
    import zipfile

    name = f"umbrella_core-{version}"
    files = {
        f"{name}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: umbrella-core\nVersion: {version}\n"
        ),
        f"{name}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    files[f"{name}.dist-info/RECORD"] = "\n".join([*record, f"{name}.dist-info/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_a_plugin_refuses_a_core_older_than_it_needs(tmp_path):
    """pip's resolver, not an ImportError at run time, tells a user the core is too old."""
    import shutil
    import sys

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    # Built from a copy: setuptools writes build/ beside the sources it builds.
    plugin = tmp_path / "umbrella_fmri"
    shutil.copytree(
        ROOT / "plugins" / "umbrella_fmri",
        plugin,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    required = next(
        r
        for r in tomllib.loads((plugin / "pyproject.toml").read_text())["project"]["dependencies"]
        if r.startswith("umbrella-core")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(wheels), str(plugin)],
        check=True,
        capture_output=True,
    )
    _fake_core_wheel(wheels, "0.3.0")
    venv.create(tmp_path / "venv", with_pip=True)
    pip = [str(tmp_path / "venv" / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    refused = subprocess.run(
        [*pip, "install", "--no-index", "--find-links", str(wheels), "umbrella-fmri"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0
    said = refused.stderr
    assert f"Could not find a version that satisfies the requirement {required}" in said, said
    assert "from versions: 0.3.0" in said
    # The same index with a core the plugin accepts installs.
    _fake_core_wheel(wheels, required.split(">=")[1].split(",")[0])
    accepted = subprocess.run(
        [*pip, "install", "-q", "--no-index", "--find-links", str(wheels), "umbrella-fmri"],
        capture_output=True,
        text=True,
    )
    assert accepted.returncode == 0, accepted.stderr
