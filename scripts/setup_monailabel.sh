#!/usr/bin/env bash
# Creates (or reuses) MONAI Label's own virtual environment and prints its python.
# Usage: bash scripts/setup_monailabel.sh
# MONAILABEL_VENV selects the folder (default: .venv-monailabel at the repository root). It is separate from
# .venv because monailabel 0.8.5 pins numpy<2 and pulls pydicom-seg (see requirements-monailabel.txt).
# Where the main venv (VENV, default .venv) already holds torch and torchvision, this venv uses them through
# links (scripts/share_torch.py) instead of a second 5 GB copy with its CUDA libraries; both pin the same builds.
# The first run installs for a few minutes; later runs skip pip while the requirements are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MONAILABEL_VENV:-.venv-monailabel}"
MAIN_VENV="${MAIN_VENV_FOR_TORCH:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
pth="$site/shared-torch.pth"
# A venv whose shared torch went away (the main venv deleted) links it again, or installs its own.
if [ -f "$pth" ] && [ ! -d "$(cat "$pth")/torch" ]; then
    rm -f "$pth" "$VENV"/.requirements-*.sha256
fi
if [ ! -d "$site/torch" ] && [ -x "$MAIN_VENV/bin/python" ]; then
    links="$(python3 scripts/share_torch.py "$MAIN_VENV/bin/python" "$MAIN_VENV/shared-torch")"
    if [ -n "$links" ]; then
        realpath "$links" > "$pth"
    fi
fi
# setup_venv.sh prints pip's progress; keep stdout for the one line callers read.
source scripts/setup_venv.sh "$VENV" requirements-monailabel.txt >&2
python -c "import monailabel, monai, torch, pydicom" >&2
command -v python
