#!/usr/bin/env bash
# One device-machine session: install the carried wheels, then run the GPU benchmarks, each under its own time
# box so one slow part cannot starve the others. Results (JSON + logs) land in $OUT (or bench/out/gpu).
#
#   carry: .whl (open_flamingo, open_clip, einops_exts, ftfy, wcwidth, and pydantic with its dependencies,
#          which models/generation.py imports through polite.config, for Python 3.12; the pip download
#          command is in BENCHMARKS.md, "Next device session")
#   run:   bash bench/gpu_all.sh              # the rewrite benchmark: paths, attention variants, profile, checks
#          LEVERS=1 ALL=1 bash bench/gpu_all.sh   # also session 1's per-lever runs, gpu_model and gpu_filters
#          REWRITE_ARGS="--attention sdpa:16,sdpa:16:compiled" bash bench/gpu_all.sh   # a shorter variant list
set -uo pipefail
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  # Triton builds its launcher with a C compiler at first use: without one, compiled variants run eagerly
  (command -v gcc || command -v cc) >/dev/null && gcc --version 2>/dev/null | head -n 1 || echo "no C compiler: torch.compile will fall back"
} 2>&1 | tee "$OUT/env.txt"

run() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  echo "=== $name (time box ${secs}s)"
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s"
  tail -n 40 "$OUT/$name.log"
}
levers=--no-levers
[ "${LEVERS:-0}" = 1 ] && levers=
# REWRITE_ARGS: more gpu_rewrite.py options, e.g. REWRITE_ARGS="--batches 256,512,768" on a 141 GB card
run gpu_rewrite "${REWRITE_S:-540}" python3 bench/gpu_rewrite.py $levers ${REWRITE_ARGS:-} --out "$OUT/gpu_rewrite.json"
if [ "${ALL:-0}" = 1 ]; then
  run gpu_model "${MODEL_S:-150}" python3 bench/gpu_model.py --out "$OUT/gpu_model.json"
  run gpu_filters "${FILTERS_S:-110}" python3 bench/gpu_filters.py --out "$OUT/gpu_filters.json"
fi
