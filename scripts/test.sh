#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
# Two workers, one test file each at a time (a file's module fixtures are built once); pass -n 0 to run in one process.
python -m pytest tests -n 2 --dist loadfile "$@"
