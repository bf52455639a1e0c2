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

# The whole suite in three phases. The tests that start no servers, in two processes
# (pytest-xdist, whole files per process): 2 min instead of 4.6; one torch thread each, as
# two processes of two threads on 2 cores slowed each other (163 s against 179 s, run
# back to back). Files with a `slow` test go first (tests/conftest.py). The integration tests,
# which start real networks on 127.0.0.1 and spend much of their time waiting on them (a
# SuperLink's heartbeat floor, lease expiry), also two at a time, whole files each (a
# module's network fixture starts once): 7.7 min instead of 12. Last, alone, the `serial`
# tests: torchrun ranks (they once aborted under an xdist worker in CI) and the demo, whose
# stages are budgeted in minutes (beside another test it trains less than its check needs).
# With PYTEST_ARGS (a selection): one plain pytest run.
test: $(STAMP)
	$(BIN)/lint-imports
ifeq ($(strip $(PYTEST_ARGS)),)
	@OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not integration and not serial" -n 2 --dist loadfile; \
	unit=$$?; \
	$(BIN)/python -m pytest -m "integration and not serial" -n 2 --dist loadfile; integ=$$?; \
	$(BIN)/python -m pytest -m serial; serial=$$?; \
	echo "unit tests: exit $$unit; integration tests: exit $$integ; serial tests: exit $$serial"; \
	[ $$unit -eq 0 ] && [ $$integ -eq 0 ] && [ $$serial -eq 0 ]
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
