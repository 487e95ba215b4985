# make demo   - the embedded default (SmolLM2-135M on CPU): table + report
# make test   - the whole test suite, including the tiny workflow in a temporary directory
# make lint   - ruff + snakemake --lint
# make test-slurm - the tiny workflow through a local single-node SLURM cluster
#
# Targets go before --configfile: it takes every following word as a config file.
# The CPU environment lives in .venv; it is created on first use (a stamp file keeps later
# calls cheap) from envs/cpu-requirements.txt, which pins the CPU build of torch.

SHELL := /bin/bash
PYTHON3 ?= python3
VENV := .venv
STAMP := $(VENV)/.denoiserotator-installed
SNAKEMAKE := $(VENV)/bin/snakemake
DEMO_CORES ?= 2
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo demo-grid test lint test-slurm venv

venv: $(STAMP)

$(STAMP): envs/cpu-requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON3) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -r envs/cpu-requirements.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

# The wall clock covers everything (the venv too, on a fresh clone), next to the CPU it ran on.
demo:
	@start=$$(date +%s); $(MAKE) --no-print-directory demo-grid || exit $$?; \
	seconds=$$(( $$(date +%s) - start )); \
	echo "Wall clock: $$(( seconds / 60 )) min $$(( seconds % 60 )) s on" \
	  "$$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//') ($$(nproc) cores)"

demo-grid: $(STAMP)
	$(SNAKEMAKE) results/tables/main.csv --cores $(DEMO_CORES) --configfile config/demo.yaml
	@$(MAKE) --no-print-directory results/report.html
	@echo
	@echo "Table:  $(CURDIR)/results/tables/main.csv (also main.parquet, main.md with the settings)"
	@echo "Plots:  $(CURDIR)/results/tables/ppl.png, $(CURDIR)/results/tables/entropy.png, $(CURDIR)/results/tables/zeroshot.png"
	@echo "Report: $(CURDIR)/results/report.html"

# rebuilt only when the table changed
results/report.html: results/tables/main.csv
	$(SNAKEMAKE) results/tables/main.csv --cores 1 --report $@ --configfile config/demo.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(SNAKEMAKE) --lint

test-slurm: $(STAMP)
	bash .ci/slurm/test-slurm.sh
