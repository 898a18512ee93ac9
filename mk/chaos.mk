# The failure suite (docs/reliability.md): faults on the wire and broker failover, under load, on every backend.
# Included from the root Makefile. `make chaos` starts what it needs (Toxiproxy, a Kafka advertised through the
# proxy, a 3-node RabbitMQ cluster, a 3-broker Kafka cluster, and the usual test brokers), runs
# integration/test_chaos.py at full volume and renders docs/reliability.md. `make test` runs the same suite at
# CHAOS_CI_MESSAGES per scenario.
CHAOS_BROKERS ?= toxiproxy rabbitmq redis kafka-proxied sqs pubsub servicebus nats postgresql rabbitmq-cluster kafka-cluster
CHAOS_MESSAGES ?= 2000
CHAOS_CI_MESSAGES ?= 300
# A comma list of rows (backends) to run, e.g. CHAOS_ROWS=redis,kafka; empty: all.
CHAOS_ROWS ?=
export MSGBUS_CHAOS_RESULTS ?= $(CURDIR)/build/chaos-results
export MSGBUS_CHAOS_MESSAGES ?= $(CHAOS_CI_MESSAGES)
# make test: shorter calm between faults (the faults themselves are the same); make chaos turns it off.
export MSGBUS_CHAOS_QUICK ?= 1

# make test runs the rows in two pytest processes at once, each on its own brokers (the suite's streams are
# light; the two cores are mostly busy restarting brokers), to stay within CI's budget.
CHAOS_CI_GROUPS ?= rabbitmq,redis,nats,postgresql,rabbitmq-cluster kafka,sqs,pubsub,servicebus,kafka-cluster
# A group may run this long (it takes about 8 minutes in CI); then it is ended with every thread's stack in its
# log (SIGABRT: faulthandler), so a hang fails the run early and says where instead of eating CI's budget.
CHAOS_CI_TIMEOUT ?= 1500

.PHONY: chaos chaos-ci reliability brokers-chaos

## Start the failure suite's brokers ahead of time (they are also started on demand by the tests).
brokers-chaos: $(VENV)/.dev
	$(BIN)/python -m integration.brokers start $(CHAOS_BROKERS)

## Every scenario on every row at CHAOS_MESSAGES per scenario, then docs/reliability.md from the results.
chaos: brokers-chaos
	CHAOS_ROWS=$(CHAOS_ROWS) MSGBUS_CHAOS_MESSAGES=$(CHAOS_MESSAGES) MSGBUS_CHAOS_QUICK=0 \
		$(BIN)/python -m pytest --import-mode=importlib integration/test_chaos.py $(PYTEST_ARGS)
	$(MAKE) reliability

## What make test runs: every row at CHAOS_CI_MESSAGES, two groups of rows in parallel, their output in turn.
chaos-ci: $(VENV)/.dev
	@mkdir -p build; pids=""; for rows in $(CHAOS_CI_GROUPS); do \
		echo "== pytest integration/test_chaos.py (rows $$rows, in the background)"; \
		CHAOS_ROWS=$$rows PYTHONFAULTHANDLER=1 timeout --signal=ABRT --kill-after=30 $(CHAOS_CI_TIMEOUT) \
			$(BIN)/python -m pytest --import-mode=importlib $(INTEGRATION_RERUNS) \
			integration/test_chaos.py $(PYTEST_ARGS) > build/chaos-ci-$$rows.log 2>&1 & pids="$$pids $$!"; \
	done; status=0; for pid in $$pids; do wait $$pid || status=1; done; \
	for rows in $(CHAOS_CI_GROUPS); do echo "== rows $$rows"; cat build/chaos-ci-$$rows.log; done; exit $$status

## Render docs/reliability.md from the latest failure-suite results.
reliability: $(VENV)/.core
	$(BIN)/python tools/reliability_report.py --results $(MSGBUS_CHAOS_RESULTS) --out docs/reliability.md
