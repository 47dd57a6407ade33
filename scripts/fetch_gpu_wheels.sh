#!/usr/bin/env bash
# Download, here, the wheels that scripts/gpu_check.sh installs on the GPU machine (which has no internet) into
# .whl/ (ignored by git; copy it along with the repository to the GPU machine).
#
# The GPU machine (x86-64, CPython 3.12, torch 2.11 cu130) has transformers 5.17.0; ivcprune needs 5.23.x.
# transformers 5.23.0 requires: huggingface-hub>=1.31,<3 (there: 1.33.0), tokenizers>=0.23.1,<0.24 (0.23.2),
# safetensors>=0.8.0 (0.8.0), regex>=2025.10.22 (version there unknown, and transformers checks it at import:
# carried), numpy, packaging, pyyaml, tqdm, typer (all there). ivcprune itself imports torch, numpy, PIL, tqdm
# and transformers at module import time; qwen-vl-utils (and its av) only inside build_inputs, i.e. for real
# checkpoints with a processor, which gpu_check.py never uses -- so they are left out unless asked for.
#
# Usage: scripts/fetch_gpu_wheels.sh                       # transformers 13.3 MB + regex 0.8 MB = 14.1 MB
#        scripts/fetch_gpu_wheels.sh --with-qwen-vl-utils  # + qwen-vl-utils (8 kB) and av (39.9 MB): 54 MB, for
#                                                          #   `ivcprune eval` on real checkpoints; with the ~7 MB
#                                                          #   repository that is close to the 64 MiB a call carries
# PYTHON=... picks the interpreter whose pip downloads (default: .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

WHEELS=(transformers==5.23.0 regex==2026.11.19)
if [ "${1:-}" = "--with-qwen-vl-utils" ]; then
  # qwen-vl-utils 0.0.14 requires av, packaging, pillow, requests (the last three are there)
  WHEELS+=(qwen-vl-utils==0.0.14 av==15.1.0)
fi

mkdir -p .whl  # ignored by .gitignore (/.whl/)

"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${WHEELS[@]}"

# one version of each package: two would stop the whole install there
dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "several versions of: $dupes -- remove the stale ones from .whl/" >&2
  exit 1
fi
ls -l .whl/
du -ch .whl/*.whl | tail -1
