#!/usr/bin/env bash
# Create .venv (or $VENV) and install stepdistill with its test and benchmark extras.
# torch and torchvision go first with exact pins; everything else is installed under a constraints
# file holding those pins, so no dependency can pull another multi-GB torch build. -qq: pip prints its
# errors only, not its notices (package-index warnings, setuptools' editable-install notice).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -qq --upgrade pip
"$VENV/bin/python" -m pip install -qq torch==2.14.1 torchvision==0.29.1
"$VENV/bin/python" -m pip install -qq -c constraints.txt -e ".[test,bench]"
