# Everything a newcomer runs. Setup is automatic: the first target creates .venv and installs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: test test-floor airflow lint format demo bench emulator clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is needed"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[test]'
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest $(PYTEST_ARGS)

# The fast tests (not `slow`) on an older Airflow in its own venv, with the pins that release needs
# (constraints/airflow-X.Y.txt). Default: the floor release, 3.0. Also: AIRFLOW_FLOOR=3.1 or 3.2.
AIRFLOW_FLOOR ?= 3.0
FLOOR_VENV ?= .venv-airflow-$(AIRFLOW_FLOOR)
FLOOR_CONSTRAINTS := constraints/airflow-$(AIRFLOW_FLOOR).txt
FLOOR_STAMP := $(FLOOR_VENV)/.installed-stamp

$(FLOOR_STAMP): pyproject.toml $(FLOOR_CONSTRAINTS) $(STAMP)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(BIN)/uv pip install --quiet --python $(FLOOR_VENV)/bin/python -c $(FLOOR_CONSTRAINTS) -e '.[test]'
	@touch $@

test-floor: $(FLOOR_STAMP)
	$(FLOOR_VENV)/bin/python -c 'import airflow; print("Airflow", airflow.__version__)'
	$(FLOOR_VENV)/bin/pytest -m "not slow" -p no:cacheprovider $(PYTEST_ARGS)

# A local deployment (api-server, scheduler, dag-processor, triggerer, emulator) with the example DAGs;
# prints the UI's URL and login, stops everything on Ctrl-C.
airflow: $(STAMP)
	$(BIN)/python -m scripts.airflow_local $(AIRFLOW_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

emulator: $(STAMP)
	$(BIN)/python -m airflow_openai_batch.emulator --port 8000

clean:
	rm -rf $(VENV) .venv-airflow-* demo-output .pytest_cache
