#!/usr/bin/env bash
# Creates (or reuses) MONAI Label's own virtual environment and prints its python.
# Usage: bash scripts/setup_monailabel.sh
# MONAILABEL_VENV selects the folder (default: .venv-monailabel at the repository root). It is separate from
# .venv because monailabel 0.8.5 pins numpy<2 and pulls pydicom-seg (see requirements-monailabel.txt).
# The first run installs for a few minutes; later runs skip pip while the requirements are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MONAILABEL_VENV:-.venv-monailabel}"
# setup_venv.sh prints pip's progress; keep stdout for the one line callers read.
source scripts/setup_venv.sh "$VENV" requirements-monailabel.txt >&2
python -c "import monailabel, monai, torch, pydicom" >&2
command -v python
