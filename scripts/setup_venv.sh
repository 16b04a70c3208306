#!/usr/bin/env bash
# Sourced by the project's entry scripts: creates or reuses a virtual environment and installs a
# requirements file into it, skipping pip when the requirements have not changed since the last install.
# Usage: source scripts/setup_venv.sh VENV_DIR REQUIREMENTS_FILE
venv_dir="$1"
requirements="$2"
if [ ! -x "$venv_dir/bin/python" ]; then
    python3 -m venv "$venv_dir"
fi
# shellcheck disable=SC1091
source "$venv_dir/bin/activate"
stamp="$venv_dir/.requirements-$(basename "$requirements").sha256"
digest="$(cat requirements*.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet -r "$requirements"
    echo "$digest" > "$stamp"
fi
