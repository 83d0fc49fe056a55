# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when it is missing
# or when requirements changed (the stamp file records what was installed).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# open_clip for the CPU tests only, outside the venv's site-packages: requirements-open-clip-test.txt
OPEN_CLIP_TEST_DIR := $(VENV)/open-clip-test
AIRFLOW_HOME_DIR := $(CURDIR)/.airflow
DEMO_CORPUS := $(CURDIR)/data/sample_corpus
DEMO_OUT := $(CURDIR)/runs/demo
DEMO_N ?= 1000
DEMO_CONF = {"corpus": "$(DEMO_CORPUS)", "config": "$(CURDIR)/configs/demo.yaml", "output_root": "$(CURDIR)/runs", "run_name": "demo"}
PYTEST_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

export AIRFLOW_HOME := $(AIRFLOW_HOME_DIR)
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN := sqlite:///$(AIRFLOW_HOME_DIR)/airflow.db
export AIRFLOW__CORE__EXECUTOR := LocalExecutor
export AIRFLOW__LOGGING__LOGGING_LEVEL := WARNING
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export GX_ANALYTICS_ENABLED := False

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements.lock requirements-open-clip-test.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -c requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	rm -rf $(OPEN_CLIP_TEST_DIR)
	$(BIN)/python -m pip install --quiet --no-deps --target $(OPEN_CLIP_TEST_DIR) -r requirements-open-clip-test.txt
	@touch $(STAMP)

demo: $(STAMP)
	@mkdir -p $(AIRFLOW_HOME_DIR)
	$(BIN)/megapairs sample-corpus $(DEMO_CORPUS) --n $(DEMO_N) --seed 0
	$(BIN)/airflow db migrate > $(AIRFLOW_HOME_DIR)/db-migrate.log 2>&1 || { cat $(AIRFLOW_HOME_DIR)/db-migrate.log; exit 1; }
	$(BIN)/airflow dags test megapairs_synthesis --conf '$(DEMO_CONF)' > $(AIRFLOW_HOME_DIR)/demo-dag-test.log 2>&1 \
		|| { tail -n 60 $(AIRFLOW_HOME_DIR)/demo-dag-test.log; echo "make demo: the DAG run failed; full log: $(AIRFLOW_HOME_DIR)/demo-dag-test.log"; exit 1; }
	$(BIN)/megapairs summary $(DEMO_OUT)

# The report's browser test needs headless Chromium (Debian packages chromium, chromium-driver).
test: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || { \
		echo "make test: installing chromium for the report's browser test"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	@echo "make test: open_clip pass (tests/fixtures/open_clip_pass.py)"
	MEGAPAIRS_TEST_PASS=open_clip PYTHONPATH=$(OPEN_CLIP_TEST_DIR) $(BIN)/python -m pytest -q $(PYTEST_ARGS) \
		|| [ $$? -eq 5 ]  # 5: PYTEST_ARGS selected no open_clip test

clean:
	rm -rf $(AIRFLOW_HOME_DIR) runs data .pytest_cache
