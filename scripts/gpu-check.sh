#!/bin/sh
# The GPU check of ablate (BENCHMARKS.md, "GPU check"): scripts/gpu_check.py with the same options.
# Run it from the repository root, with ablate's environment active: scripts/gpu-check.sh [--cpu]
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
