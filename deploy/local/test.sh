#!/usr/bin/env bash
# README command 2: set up and run the whole test suite against a real Kafka broker
# and a real PostgreSQL, both started here. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/local/bootstrap.sh --test

# Stop at the end only what this run started, so a developer's running stack survives.
was_running=0
.venv/bin/pipeline stack status >/dev/null 2>&1 && was_running=1
.venv/bin/pipeline stack up --no-services
cleanup() { [ "$was_running" = 1 ] || .venv/bin/pipeline stack down; }
trap cleanup EXIT

# The website snippet's unit tests (Node's built-in runner); its browser tests are in pytest.
node --test snippet/test/

# pytest exits 5 when it collected no test: that is a failure here, and stays one.
.venv/bin/python -m pytest -ra "$@"
