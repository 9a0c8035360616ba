#!/usr/bin/env bash
# The first command on a lent GPU: eval/gpu_smoke.py (SD1.5-size DMD2 at 64x64 latents, bf16, batch 4,
# and the reduced-depth families this version has), under 8 minutes. It prints one JSON line per case
# and, where the device tool's $OUT is set, leaves results.json there.
#
# The device image holds torch, accelerate, transformers and peft, not diffusers. Carry its wheel:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl "diffusers==0.42.1"
# and pass carry=[".whl"]. The run folders go to a scratch folder; only results.json comes back.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if ! ls .whl/diffusers-*.whl >/dev/null 2>&1; then
    echo "error: diffusers is not installed and .whl/ holds no diffusers wheel (see eval/gpu_smoke.sh's header)" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps .whl/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
WORK=$(mktemp -d)
timeout 470 "$PY" eval/gpu_smoke.py --out "$WORK/gpu_smoke" "$@"
if [ -n "${OUT:-}" ]; then cp "$WORK/gpu_smoke/results.json" "$OUT/"; fi
