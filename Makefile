# The two commands of the README:  `make demo` (the full loop on the synthetic world, CPU)
# and `make test` (lint + the whole test suite). Both create the environment on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo.yaml
ARGS ?=
CLIP_RETRIEVAL := 2.45.0
# The environment's programs first on PATH, as cluster.yaml sets up a node, so every process a
# target starts (jobs, Ray's workers, `ray job submit`'s drivers) uses one toolchain. torch builds
# DeepSpeed's CPU communication op with the `ninja` on PATH; Debian's and the wheel's keep build
# logs the other reads as stale, and each rebuilt the op (35-60 s) after the other had.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test lint unit integration world env browser docs clean

env: $(STAMP)

# torch goes in first, as the CUDA build from PyPI: local wheel mirrors (find-links in pip.conf or
# PIP_FIND_LINKS) may hold a CPU-only torch that satisfies `torch==X` but breaks torchvision
# ("operator torchvision::nms does not exist"). Ignoring pip's config files for this one step makes
# pip take PyPI's build, which runs fine without a GPU. Everything after resolves against it.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(PY) -m pip install -q \
	    "torch==$$(sed -n 's/.*"torch==\([^"]*\)".*/\1/p' pyproject.toml)" \
	    "torchvision==$$(sed -n 's/.*"torchvision==\([^"]*\)".*/\1/p' pyproject.toml)"
	$(PY) -m pip install -q -e '.[dev]'
	# clip-retrieval's ClipClient and clip-front build, for the tests of our clip-back API: without
	# its dependencies (its server's pins clash with ours; the client needs only requests).
	$(PY) -m pip install -q --no-deps "clip-retrieval==$(CLIP_RETRIEVAL)"
	$(PY) -c "import torchvision, open_clip, ray, faiss, deepspeed; print('environment ok: torch', __import__('torch').__version__)"
	touch $@

# Debian's chromium, for the tests that render report.html (and the search page) headless.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	    echo "installing chromium for the browser tests"; \
	    apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

demo: $(STAMP)
	$(PY) -m pipelines.demo --config $(CONFIG) $(ARGS)

world: $(STAMP)
	$(PY) -m pipelines.make_world --config $(CONFIG) $(ARGS)

# docs/configuration.md from the typed config models (tests/serve/test_config_reference.py
# fails when the file differs from what this writes).
docs: $(STAMP)
	$(PY) -m serve.config_reference

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

unit: $(STAMP)
	$(PY) -m pytest tests/unit tests/serve $(ARGS)

integration: $(STAMP) browser
	$(PY) -m pytest tests/integration $(ARGS)

test: lint browser
	$(PY) -m pytest tests $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
