#!/usr/bin/env bash
# Creates or updates a Python virtualenv from a pinned requirements file, and does nothing when
# it already matches (a stamp holds the file's SHA-256). Used by scripts/schemathesis.sh and by
# scripts/test.sh for the OAuth client test (tests/oauth_client.py).
#
# Usage: bash scripts/python-venv.sh VENV_DIR REQUIREMENTS_FILE
# Environment: PYTHON  interpreter to create the virtualenv with (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${1:?usage: python-venv.sh VENV_DIR REQUIREMENTS_FILE}
REQUIREMENTS=${2:?usage: python-venv.sh VENV_DIR REQUIREMENTS_FILE}

stamp="$VENV/.requirements.sha256"
want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
if [[ ! -x "$VENV/bin/python" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    printf '[python-venv.sh] installing %s into %s\n' "$REQUIREMENTS" "$VENV" >&2
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
    echo "$want" >"$stamp"
fi
