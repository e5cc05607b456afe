#!/usr/bin/env bash
# Set up nf and start the local demo cluster (agents on loopback), then show its status:
#   ./scripts/demo.sh [--nodes 3]      stop it with: .venv/bin/nf demo down --workdir demo
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/nf demo up --workdir demo "$@"
