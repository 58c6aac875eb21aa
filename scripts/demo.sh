#!/usr/bin/env bash
# The main job end to end on the local lab: set up, bring up a login node and two 8-GPU nodes,
# apply the lab's fleet through the login node, and show the fleet table.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/gpufleet lab up --nodes "${NODES:-2}" --gpus "${GPUS:-8}" --vendor "${VENDOR:-nvidia}"
.venv/bin/gpufleet apply -f "${GPUFLEET_HOME:-$HOME/.gpufleet}/lab/fleet.yml" -y
