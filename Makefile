# Perspective — two commands matter: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench protos clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "Python 3.11 is required (set PY=/path/to/python3.11)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/perspective demo $(DEMO_ARGS)

# The whole suite: the tests that start no servers in two processes (pytest-xdist, whole
# files per process: 2.7 min instead of 4.6 on 2 cores), then the integration tests, which
# start real networks, one at a time. With PYTEST_ARGS (a selection): one plain pytest run.
test: $(STAMP)
	$(BIN)/lint-imports
ifeq ($(strip $(PYTEST_ARGS)),)
	@$(BIN)/python -m pytest -m "not integration" -n 2 --dist loadfile; unit=$$?; \
	$(BIN)/python -m pytest -m integration; integ=$$?; \
	echo "unit tests: exit $$unit; integration tests: exit $$integ"; \
	[ $$unit -eq 0 ] && [ $$integ -eq 0 ]
else
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$rc
endif

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/model_bench.py

protos: $(STAMP)
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) build *.egg-info
