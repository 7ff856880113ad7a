# The README's commands. Everything installs into .venv with the pinned CPU torch.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PACKAGES := -e ".[serve]" -e plugins/umbrella_t1 -e plugins/umbrella_fmri -e plugins/umbrella_dmri -e plugins/umbrella_studies

.PHONY: install demo test test-install test-fast lint typecheck

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PIP) install -c constraints.txt $(PACKAGES)

demo: install
	$(VENV)/bin/umbrella train --modalities t1,dmri

# The test tools, and the example third-party study plugin installed for real
# (its tests train on it through its entry point).
test-install: install
	$(PIP) install -c constraints.txt -e ".[test]" -e examples/umbrella-example-study

test: test-install
	$(PY) -m pytest

test-fast: test-install
	$(PY) -m pytest -m "not slow"

# ruff's lint rules and formatting (pyproject.toml's [tool.ruff]); .ci/run runs it first.
lint: test-install
	$(VENV)/bin/ruff check umbrella_core plugins examples tests benchmarks
	$(VENV)/bin/ruff format --check umbrella_core plugins examples tests benchmarks

# mypy over the core and the first-party plugins (pyproject.toml's [tool.mypy]);
# .ci/run runs it after lint.
typecheck: test-install
	$(VENV)/bin/mypy umbrella_core plugins/umbrella_t1/umbrella_t1 plugins/umbrella_fmri/umbrella_fmri \
		plugins/umbrella_dmri/umbrella_dmri plugins/umbrella_studies/umbrella_studies
