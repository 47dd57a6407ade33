#!/usr/bin/env bash
# GPU check of ivcprune in one command: equivalence on the device in bf16 (and float32) and the benchmark at
# Qwen2.5-VL-7B's shapes; writes gpu_check.md (one markdown report), gpu_check.json and gpu_check.log to
# ${OUT:-gpu_check_out}. On an H200 it took 161 s (equivalence 31 s, benchmark 118 s, the rest wheel install);
# on slower cards scripts/gpu_check.py skips (or, by SIGALRM, aborts) benchmark runs that would overrun its
# --time-budget (330 s from its start, equivalence included), so with the install it stays under 8 minutes.
#
# On a GPU machine without internet whose Python lacks transformers 5.23, bring the wheels along:
#
#        scripts/fetch_gpu_wheels.sh        # on a machine with PyPI access: .whl/transformers-5.23.0-*.whl
#                                           # and .whl/regex-*.whl, for CPython 3.12 on x86-64 Linux (~14 MB)
#
#    then copy the repository with its .whl/ folder (git-ignored) and run, there:
#
#        bash scripts/gpu_check.sh          # installs .whl/*.whl into /tmp/site first, when the folder exists
#
#    transformers 5.23's other requirements (huggingface-hub, tokenizers, safetensors, typer, pyyaml, numpy,
#    tqdm, packaging) are taken from the machine; qwen-vl-utils / av are not needed (this check builds no inputs
#    from real images; `scripts/fetch_gpu_wheels.sh --with-qwen-vl-utils` adds them for other work).
#    Options go through to scripts/gpu_check.py, e.g. "bash scripts/gpu_check.sh --skip-bench" or
#    "bash scripts/gpu_check.sh --image-tokens 1024 4096 --batch-sizes 1 8 --vision-depth 0".
#
# As a smoke run on the CPU (without .whl/):
#        PYTHON=.venv/bin/python bash scripts/gpu_check.sh --device cpu --dtype float32 --quick
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT_DIR="${OUT:-gpu_check_out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  echo "== installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site: $(cd .whl && ls *.whl | tr '\n' ' ')"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed (the wheels are for CPython 3.12 on x86-64 Linux)" >&2; exit 2; }
  export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "== no .whl/ folder: using the installed packages (scripts/fetch_gpu_wheels.sh fetches transformers 5.23 for an offline machine)"
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== environment"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'EOF' 2>&1 | tee "$OUT_DIR/env.txt"
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.1f} GiB", f"sm_{p.major}{p.minor}")
for name in ("transformers", "huggingface_hub", "tokenizers", "safetensors", "regex", "accelerate", "ivcprune"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as exc:
        print(name, "does not import:", type(exc).__name__, exc)
try:
    import flash_attn
    print("flash_attn imports", getattr(flash_attn, "__version__", "?"))
except Exception as exc:
    print("flash_attn does not import:", type(exc).__name__, str(exc)[:200])
import transformers
if not transformers.__version__.startswith("5.23."):
    print(f"WARNING: transformers {transformers.__version__}, ivcprune is tested with 5.23 (see scripts/fetch_gpu_wheels.sh)")
EOF

echo "== scripts/gpu_check.py $*"
"$PY" scripts/gpu_check.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
rc=${PIPESTATUS[0]}
MD="$OUT_DIR/gpu_check.md"
echo
echo "== $MD, shortened: header, equivalence rows that did not PASS, bench (exit status $rc)"
if [ -f "$MD" ]; then
  sed -n '1,/^## Equivalence/p' "$MD"
  awk '/^## Equivalence/{on=1} /^## Bench/{on=0} on && /\| (FAIL|SKIP) \|/' "$MD" | grep . || echo "(every equivalence row PASS)"
  echo
  sed -n '/^## Bench/,$p' "$MD"
fi
exit "$rc"
