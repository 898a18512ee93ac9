#!/usr/bin/env bash
# Provision the real brokers the integration tests run against: install what is missing (apt-get as root),
# start each as a local process on its fixed 127.0.0.1 test port, and wait until it really serves clients.
# Idempotent: brokers already up are left alone. Exits non-zero, with the broker's log tail, on any failure.
#   MSGBUS_PROVISION_BROKERS  brokers to start (default: rabbitmq redis nats)
#   PYTHON                    interpreter (default: .venv/bin/python if present, else python3; stdlib suffices)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
brokers=${MSGBUS_PROVISION_BROKERS:-rabbitmq redis nats}
began=$(date +%s)
echo "provision: starting brokers: ${brokers} (python: ${PYTHON})"
# shellcheck disable=SC2086  # the broker list is meant to split into words
"${PYTHON}" -m integration.brokers start ${brokers}
# shellcheck disable=SC2086
"${PYTHON}" -m integration.brokers status ${brokers}
echo "provision: ready in $(( $(date +%s) - began ))s; stop with: ${PYTHON} -m integration.brokers stop ${brokers}"
