#!/usr/bin/env bash
# The whole GPU device run as one short command (see benchmarks/README.md, "gpu_check.py"):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-wheels"], timeout_s=600)
# Installs the carried wheels (benchmarks/fetch_gpu_wheels.sh) whose distributions this Python lacks or has
# older into .gpu-site (never touching the device's own packages), then runs the check within a time budget,
# writing the table, the JSON figures and the log to $OUT. GPU_CHECK_ARGS adds options (e.g. --only vlm_yesno).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check-out}
PY=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WHEELS=${WHEELS:-.gpu-wheels}
wheels=$(WHEELS=$WHEELS "$PY" - <<'PYEOF'
import glob, importlib.metadata as md, os
from packaging.version import Version
for w in sorted(glob.glob(os.environ["WHEELS"] + "/*.whl")):
    name, version = w.split("/")[-1].split("-")[:2]
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have is None or Version(have) < Version(version):
        print(w)
PYEOF
)
if [ -n "$wheels" ]; then
  if "$PY" -m pip --version > /dev/null 2>&1; then
    # shellcheck disable=SC2086 # one path per word
    "$PY" -m pip install --quiet --no-index --no-deps --target .gpu-site $wheels
  else  # no pip: these wheels have no .data directories, so unpacking them is the whole install
    # shellcheck disable=SC2086
    "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(".gpu-site") for w in sys.argv[1:]]' $wheels
  fi
fi
export PYTHONPATH="$PWD/.gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi || true; echo "installed from $WHEELS: ${wheels:-nothing}"; } > "$OUT/env.txt" 2>&1
# shellcheck disable=SC2086 # GPU_CHECK_ARGS is a list of options
timeout "${GPU_CHECK_TIMEOUT:-560}" "$PY" benchmarks/gpu_check.py --device auto --budget-s "${GPU_CHECK_BUDGET:-420}" \
    --out "$OUT/gpu_check.md" --json "$OUT/gpu_check.json" ${GPU_CHECK_ARGS:-} 2>&1 | tee "$OUT/gpu_check.log" | \
    grep -v -E "Loading weights|Writing model shards| root INFO "
