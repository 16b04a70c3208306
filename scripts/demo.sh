#!/usr/bin/env bash
# Sets up the virtual environment (runtime requirements) and runs the project's main job on this machine.
# Usage: bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
source scripts/setup_venv.sh "$VENV" requirements.txt
python scripts/smoke_network.py
