#!/usr/bin/env bash
# The digits demo in one command, on a fresh machine too: creates .venv if missing (scripts/venv.sh),
# runs sweeps/demo_digits.yaml (8 trials on the CPU) and its report, and prints where the report's
# index.html is. Run it again at any time: a finished demo is not rerun, an interrupted one resumes,
# and the report is rewritten.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR source=venv.sh
. scripts/venv.sh
ensure_venv "" ablate
"$venv/bin/ablate" run sweeps/demo_digits.yaml
"$venv/bin/ablate" report runs/demo_digits
echo "report: $PWD/reports/demo_digits/index.html"
