# The two commands of the README. Both set up what they need first (the CPU build of torch when no torch
# is installed: a plain `pip install torch` would pull a multi-GB CUDA build).
PYTHON ?= python3

.PHONY: setup demo test

setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test]'

demo: setup
	$(PYTHON) benchmarks/lm/demo.py

test: setup
	$(PYTHON) -m pytest -q tests
