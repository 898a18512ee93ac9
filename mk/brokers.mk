# Local brokers for the integration tests, as processes on 127.0.0.1 (no Docker). See docs/brokers.md.
# Included from the root Makefile. Override the set with `make brokers BROKERS="redis nats"`.
BROKERS ?= rabbitmq redis nats kafka pubsub sqs servicebus postgresql
BROKERS_PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: brokers brokers-stop brokers-restart brokers-status

## Install (if missing) and start the local test brokers; a no-op for those already up.
brokers:
	$(BROKERS_PYTHON) -m integration.brokers start $(BROKERS)

## Stop the local test brokers started by `make brokers` (never any other process).
brokers-stop:
	$(BROKERS_PYTHON) -m integration.brokers stop $(BROKERS)

## Restart them on the same data.
brokers-restart:
	$(BROKERS_PYTHON) -m integration.brokers restart $(BROKERS)

## Show which are running and ready; exits non-zero when one is not.
brokers-status:
	$(BROKERS_PYTHON) -m integration.brokers status $(BROKERS)
