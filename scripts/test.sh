#!/usr/bin/env bash
# Set up a virtual environment with the test extra and run the suite (README: "Run the tests").
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch pinned: 2.13.0 is the CPU build; a looser spec may pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test]"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
