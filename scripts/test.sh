#!/usr/bin/env bash
# Run every test: set up (as scripts/setup.sh), start PostgreSQL, then pytest. Lab tests need root;
# they create and remove their own lab in a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# the state tests run on SQLite and on a real PostgreSQL server
GPUFLEET_TEST_DATABASE_URL=$(scripts/postgres.sh)
export GPUFLEET_TEST_DATABASE_URL
# every test runs: tests/conftest.py reports a skipped test as failed while this is set
export GPUFLEET_TEST_NO_SKIP=1
exec .venv/bin/python -m pytest -q -ra --durations=25 "$@"
