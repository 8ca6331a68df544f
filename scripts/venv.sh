# shellcheck shell=bash
# Sourced by demo.sh and test.sh (from the repository root): the project's virtual environment,
# created on first use as the README's set-up does. ABLATE_VENV names another venv to use instead
# of .venv (the tests pass their own, which already has ablate installed); PYTHON names the
# interpreter that creates it (default python3).
venv="${ABLATE_VENV:-.venv}"

# ensure_venv EXTRAS TOOL: create the venv and install ablate with EXTRAS ("" or "[dev]") unless
# the venv already has TOOL (ablate, pytest), which an earlier complete install left there.
ensure_venv() {
    if [ -x "$venv/bin/$2" ]; then
        return
    fi
    local python="${PYTHON:-python3}"
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        local found
        found=$("$python" -V 2>&1) || found="not found"
        echo "$0: ablate needs Python 3.10 or newer; $python is $found (install one, or name it: PYTHON=python3.11 $0)" >&2
        exit 2
    fi
    echo "$0: installing ablate$1 into $venv (once; torch and its CUDA wheels are about 6 GB)" >&2
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip  # an editable install needs pip >= 21.3
    "$venv/bin/python" -m pip install --quiet -c constraints.txt -e ".$1"
}
