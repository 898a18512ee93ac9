# Benchmarks: msgbus vs the raw clients vs kombu and FastStream (see docs/benchmarks.md).
# Included from the root Makefile. `make bench` starts the brokers it needs, installs the harness's own
# requirements into the venv (never the core's), measures, writes benchmarks/results/*.json and renders
# docs/benchmarks.md. `make bench-smoke` proves the harness works in seconds (embedded backends, no timing).
BENCH_BROKERS ?= memory sqlite rabbitmq redis kafka nats sqs pubsub servicebus postgresql
# The brokers among them that run as local processes (integration/brokers.py); sqs, pubsub and servicebus are
# their local stand-ins: moto, Google's pstest fake and the sbbroker test double.
BENCH_LOCAL := $(filter rabbitmq redis kafka nats sqs pubsub servicebus postgresql,$(BENCH_BROKERS))
BENCH_ARGS ?=
BENCH_PYTHON ?= .venv/bin/python

.PHONY: bench bench-smoke bench-deps

.venv/.bench: benchmarks/requirements.txt $(VENV)/.dev
	$(BENCH_PYTHON) -m pip install -q -r benchmarks/requirements.txt
	@touch $@

bench-deps: .venv/.bench

## Full run (about 8 minutes per broker on two cores; sqs on moto about 30, or 10 with BENCH_ARGS="--messages 3000");
## BENCH_BROKERS="rabbitmq" for one.
bench: .venv/.bench
	$(if $(BENCH_LOCAL),$(BENCH_PYTHON) -m integration.brokers start $(BENCH_LOCAL))
	$(BENCH_PYTHON) -m benchmarks.bench $(BENCH_BROKERS) $(BENCH_ARGS)

## Seconds: one tiny run per workload on memory:// and sqlite://, every message counted, nothing written.
bench-smoke:
	$(BENCH_PYTHON) -m pytest tests/test_bench_smoke.py -q
