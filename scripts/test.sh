#!/usr/bin/env bash
# The tests in one command: creates .venv with the dev extra if needed (scripts/venv.sh), then runs
# pytest (the default tests, CPU only). `scripts/test.sh --slow` then runs `pytest -m slow` too,
# also after a failure of the first; the status is non-zero if either failed. Further arguments go
# to pytest: scripts/test.sh -x -k report.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR source=venv.sh
. scripts/venv.sh
slow=0
if [ "${1:-}" = "--slow" ]; then
    slow=1
    shift
fi
ensure_venv "[dev]" pytest
status=0
"$venv/bin/pytest" "$@" || status=$?
if [ "$slow" = 1 ]; then
    "$venv/bin/pytest" -m slow "$@" || status=$?
fi
exit "$status"
