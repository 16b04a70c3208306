#!/usr/bin/env bash
# Creates (or reuses) the virtual environment, installs the requirements and runs the test suite.
# Usage: bash scripts/test.sh [extra pytest arguments]
# VENV selects the environment folder (default: .venv at the repository root).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
source scripts/setup_venv.sh "$VENV" requirements-dev.txt
python -m pytest "$@"
