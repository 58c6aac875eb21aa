#!/usr/bin/env bash
# Run every test: set up (as scripts/setup.sh), then pytest. Lab tests need root; they create and
# remove their own lab in a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q -ra "$@"
