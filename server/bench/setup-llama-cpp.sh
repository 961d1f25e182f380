#!/usr/bin/env bash
# Installs llama.cpp's Python binding into a local venv so `attune bench --llama-cpp` can measure
# llama.cpp on the same machine, GGUF, prompt and thread count. Not part of CI: it compiles
# llama.cpp from source (several minutes on two cores) with its default native CPU flags.
#
#   bash server/bench/setup-llama-cpp.sh [VENV_DIR]     (default: target/llama-cpp-venv)
set -euo pipefail
venv="${1:-target/llama-cpp-venv}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "llama-cpp-python==0.3.36" numpy
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'ready in $venv')"
