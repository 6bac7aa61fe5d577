# The two commands of the README:
#   make demo   install, bring the local stack up, run the main job on the toy preset
#   make test   install, run the whole test suite (unit, integration, e2e)
# Both create or reuse the virtual environment in .venv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-unit stack-up stack-down browser lock clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Python >= 3.11 is required (PYTHON=$(PYTHON))"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $@

.env: | $(STAMP)
	$(BIN)/icd stack init-env

stack-up: install .env
	$(BIN)/icd stack up

stack-down: install
	$(BIN)/icd stack down

demo: stack-up
	@echo "== checking the stack from inside a Ray job (Ray Data <-> S3, MLflow)"
	eval "$$($(BIN)/icd stack env)" && $(BIN)/ray job submit --working-dir . -- python jobs/check_stack.py
	@echo "== shapes-world shards to S3 (skipped when already there)"
	eval "$$($(BIN)/icd stack env)" && $(BIN)/python jobs/make_shards.py --name shapes --count 20000 --eval-count 512 --val-count 256 --skip-existing
	@echo "== the training DAG as a Ray job: latents -> cfg_distill -> icd -> (evaluate || cycle) -> evaluate -> register -> promote"
	eval "$$($(BIN)/icd stack env)" && $(BIN)/ray job submit --working-dir . -- python jobs/train_icd.py --config jobs/configs/toy.yaml
	@echo "== editing a held-out image with models:/icd-toy@champion"
	eval "$$($(BIN)/icd stack env)" && $(BIN)/python jobs/demo_edit.py --config jobs/configs/toy.yaml
	@echo "== serving models:/icd-toy@champion with Ray Serve (serve/config.yaml)"
	$(BIN)/icd serve up
	@$(BIN)/icd stack status
	@echo "MLflow UI: $$($(BIN)/icd stack env | sed -n "s/^export MLFLOW_TRACKING_URI=//p")"
	@echo "Ray dashboard: $$($(BIN)/icd stack env | sed -n "s/^export RAY_DASHBOARD_ADDRESS=//p")"

# The web page test drives Debian's chromium through Playwright (no browser download).
browser:
	@test -x /usr/bin/chromium || { \
	  echo "installing chromium (apt) for the web page test"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo -n); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; } || \
	  { echo "the web page test needs /usr/bin/chromium: apt-get install chromium"; exit 1; }

test: install browser
	$(BIN)/python -X faulthandler -m pytest  # a crash in native code prints every thread's stack

test-unit: install
	$(BIN)/python -m pytest tests/unit

lock: install
	{ echo "# Exact versions this project is tested with (pip freeze of .venv on the CPU dev machine)."; \
	  echo "# Used as pip constraints by the Makefile; regenerate with: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^-e'; } > constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info platform/*.egg-info
