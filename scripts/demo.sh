#!/usr/bin/env bash
# Set up a virtual environment and run the end-to-end demo (README: "Try it").
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[train,deploy]"
.venv/bin/mlx-bridge demo "$@"
