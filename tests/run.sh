#!/usr/bin/env bash
# Run the test suite (installs the project and pytest first when needed): bash tests/run.sh [pytest args]
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/../scripts/env.sh"
ppdb_install test
cd "$PPDB_ROOT"
exec "$PY" -m pytest tests "$@"
