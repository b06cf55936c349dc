# The two set-up commands of the README. Each creates .venv on first use (about a minute), then
# runs. On a machine without an NVIDIA GPU, constraints-cpu.txt keeps pip on the CPU build of torch.
PYTHON ?= python3
VENV := .venv
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")

.PHONY: quickstart test

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(CONSTRAINTS) -e '.[dev]'
	$(VENV)/bin/python -c "from distill._compat import install_startup_hook_if_needed as f; print(f())"
	touch $@

quickstart: $(VENV)/.installed
	$(VENV)/bin/distill run recipes/quickstart.yaml

# Two workers: much of the suite is processes starting and single-threaded Python; PASSIVE keeps
# their OpenMP threads from spinning against each other on 2 cores (several times slower);
# worksteal: the default scheduler hands out chunks in order, so the slow modules, collected
# first, mostly landed on one worker (timings: docs/results.md, The test suite).
test: $(VENV)/.installed
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/python -m pytest -q -n 2 --dist worksteal
