# msgbus: `make demo` runs the order-system demo on the embedded default; `make test` runs everything.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ADAPTERS := $(wildcard adapters/*/pyproject.toml)
ADAPTER_DIRS := $(patsubst %/pyproject.toml,%,$(ADAPTERS))
PYTEST_ARGS ?=
# Contract runs append their results here; `make matrix` renders docs/capabilities.md from them.
export MSGBUS_CONTRACT_RESULTS ?= $(CURDIR)/build/contract-results

.PHONY: demo test lint unit integration install clean help matrix mutants docs dist lower-bounds

help:
	@echo "make demo          run the order-system demo on the embedded SQLite backend"
	@echo "make test          lint, type-check, start local brokers, run every test"
	@echo "make lint          ruff + mypy only"
	@echo "make matrix        render docs/capabilities.md from the latest contract runs"
	@echo "make docs          build the docs site into build/site (mkdocs --strict: a broken link fails)"
	@echo "make dist          build and check the wheels and sdists of the core and every adapter (build/dist)"
	@echo "make lower-bounds  each adapter at the lowest dependency versions it declares: unit tests, one round trip"
	@echo "make mutants       run every mutant of the catalogue against the contract; fills docs/contract.md"
	@echo "make brokers       start the local test brokers; make brokers-stop stops them"
	@echo "make chaos         the failure suite at full volume, then docs/reliability.md"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The core alone: what a user of the embedded backends installs.
$(VENV)/.core: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	@touch $@

# The core with dev tools and every adapter in the workspace.
$(VENV)/.dev: $(BIN)/python pyproject.toml $(ADAPTERS)
	$(BIN)/pip install -q -e ".[dev]" $(foreach a,$(ADAPTER_DIRS),-e $(a))
	@touch $@

install: $(VENV)/.dev

demo: $(VENV)/.core
	$(BIN)/msgbus demo

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict msgbus $(foreach a,$(ADAPTER_DIRS),$(a)/msgbus_$(notdir $(a)))

# Two workers (pytest-xdist): most unit tests wait on timers and subprocesses, not on the CPU.
UNIT_WORKERS ?= 2
unit: $(VENV)/.dev
	$(BIN)/python -m pytest tests -n $(UNIT_WORKERS) $(PYTEST_ARGS)

# One pytest process per test file: a client library's leftovers (sockets it leaves to the GC) must not surface
# in another broker's tests. tools/run_integration.py runs them in phases of two lanes at once, each lane owning
# the brokers it restarts; then the failure suite (chaos-ci); then the summary again. importlib mode: every adapter has its own
# tests/test_codec.py. Brokers that cannot start here (no root for apt, say) leave their tests skipped with the
# reason, unless MSGBUS_REQUIRE_BACKENDS names them (CI does): then those tests fail.
# Real brokers share two cores with the tests: a check that fails is run once more, visibly ("RERUN" in the
# output). A promise that is really broken fails both times; counts stay exact within each run.
INTEGRATION_RERUNS ?= --reruns 1 --reruns-delay 5
# Each contract test file runs its checks 4 at a time (ContractSuite.jobs): most of a check is waiting out a
# lock; a suite may ask for fewer (Kafka: 2). A rerun runs its check alone.
CONTRACT_JOBS ?= 4
export MSGBUS_INTEGRATION_SUMMARY ?= $(CURDIR)/build/integration-summary.txt
integration: $(VENV)/.dev
	$(MAKE) brokers || echo "make: some brokers did not start; their tests skip unless MSGBUS_REQUIRE_BACKENDS names them"
	@rm -f $(MSGBUS_INTEGRATION_SUMMARY)
	@status=0; MSGBUS_CONTRACT_JOBS=$(CONTRACT_JOBS) $(BIN)/python tools/run_integration.py $(INTEGRATION_RERUNS) \
		$(PYTEST_ARGS) || status=1; \
		$(MAKE) chaos-ci || status=1; cat $(MSGBUS_INTEGRATION_SUMMARY) 2>/dev/null; exit $$status

test: lint docs dist unit lower-bounds integration

# The whole mutant catalogue (mutants/catalogue.toml): each realistic bug, applied to a copy of the tree, must
# fail one of its contract checks on every backend it applies to; `make test` runs the quick subset. Writes
# build/mutants.json and the table in docs/contract.md. MUTANTS_ARGS="--backend kafka" for one backend.
MUTANTS_ARGS ?=
mutants: $(VENV)/.dev
	$(MAKE) brokers || echo "make: some brokers did not start; their mutants error"
	$(BIN)/python -m mutants --json build/mutants.json --docs docs/contract.md $(MUTANTS_ARGS)

matrix: $(VENV)/.core
	$(BIN)/python tools/capability_matrix.py --results $(MSGBUS_CONTRACT_RESULTS) --out docs/capabilities.md

# The docs site (mkdocs.yml): every page of docs/ and an API reference from the docstrings; --strict fails on a
# broken link, anchor or reference. About 5 s.
$(VENV)/.docs: $(VENV)/.dev
	$(BIN)/pip install -q -e ".[docs]"
	@touch $@

docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# Wheels and sdists of the core and every adapter into build/dist, checked by twine (--strict: a README that
# would not render on the index fails) and by tools/check_release.py (versions, changelog, the core pin).
DIST_DIR := build/dist
$(VENV)/.release: $(VENV)/.dev
	$(BIN)/pip install -q -e ".[release]"
	@touch $@

dist: $(VENV)/.release
	@rm -rf $(DIST_DIR)
	@for p in . $(ADAPTER_DIRS); do $(BIN)/python -m build --no-isolation --outdir $(DIST_DIR) $$p >/dev/null || exit 1; done
	$(BIN)/twine check --strict $(DIST_DIR)/*
	$(BIN)/python tools/check_release.py $(DIST_DIR)

# Each adapter in a throwaway venv (build/lower-bounds/<name>) with its direct dependencies at the lowest versions
# its pyproject allows (uv --resolution lowest-direct), checked to be at those bounds; its test_codec.py and
# test_config.py there, and one contract check through its broker. 3 adapters at a time; about 90 s here.
LOWER_BOUNDS_ARGS ?=
lower-bounds: $(VENV)/.release
	$(MAKE) brokers || echo "make: some brokers did not start; their round trips skip unless MSGBUS_REQUIRE_BACKENDS names them"
	$(BIN)/python tools/lower_bounds.py $(LOWER_BOUNDS_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

-include mk/brokers.mk
-include mk/bench.mk
-include mk/chaos.mk
