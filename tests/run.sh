#!/usr/bin/env bash
# Run the test suite: bash tests/run.sh [pytest args]. Installs first when needed: the project and pytest
# (.venv), and the PyTorch + diffusers client that the interop tests compare against (.venv-torch).
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/../scripts/env.sh"
ppdb_install test
PPDB_TORCH_PYTHON=${PPDB_TORCH_PYTHON:-$(ppdb_torch_client)}
export PPDB_TORCH_PYTHON
cd "$PPDB_ROOT"
exec "$PY" -m pytest tests "$@"
