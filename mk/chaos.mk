# The failure suite (docs/reliability.md): faults on the wire and broker failover, under load, on every backend.
# Included from the root Makefile. `make chaos` starts what it needs (Toxiproxy, a Kafka advertised through the
# proxy, a 3-node RabbitMQ cluster, a 3-broker Kafka cluster, and the usual test brokers), runs
# integration/test_chaos.py at full volume and renders docs/reliability.md. `make test` runs the same suite at
# CHAOS_CI_MESSAGES per scenario.
CHAOS_BROKERS ?= toxiproxy rabbitmq redis kafka-proxied sqs pubsub servicebus rabbitmq-cluster kafka-cluster
CHAOS_MESSAGES ?= 2000
CHAOS_CI_MESSAGES ?= 300
# A comma list of rows (backends) to run, e.g. CHAOS_ROWS=redis,kafka; empty: all.
CHAOS_ROWS ?=
export MSGBUS_CHAOS_RESULTS ?= $(CURDIR)/build/chaos-results
export MSGBUS_CHAOS_MESSAGES ?= $(CHAOS_CI_MESSAGES)
# make test: shorter calm between faults (the faults themselves are the same); make chaos turns it off.
export MSGBUS_CHAOS_QUICK ?= 1

.PHONY: chaos reliability brokers-chaos

## Start the failure suite's brokers ahead of time (they are also started on demand by the tests).
brokers-chaos: $(VENV)/.dev
	$(BIN)/python -m integration.brokers start $(CHAOS_BROKERS)

## Every scenario on every row at CHAOS_MESSAGES per scenario, then docs/reliability.md from the results.
chaos: brokers-chaos
	CHAOS_ROWS=$(CHAOS_ROWS) MSGBUS_CHAOS_MESSAGES=$(CHAOS_MESSAGES) MSGBUS_CHAOS_QUICK=0 \
		$(BIN)/python -m pytest --import-mode=importlib integration/test_chaos.py $(PYTEST_ARGS)
	$(MAKE) reliability

## Render docs/reliability.md from the latest failure-suite results.
reliability: $(VENV)/.core
	$(BIN)/python tools/reliability_report.py --results $(MSGBUS_CHAOS_RESULTS) --out docs/reliability.md
