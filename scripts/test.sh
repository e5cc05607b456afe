#!/usr/bin/env bash
# Set up and run the whole test suite: ./scripts/test.sh [pytest args]
# Needs a Debian machine with Python 3.11; as root it installs what the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
