#!/usr/bin/env bash
# The main job end to end on the built-in synthetic data. Everything it makes goes under demo_output/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_venv.sh
PY="$ROOT/.venv/bin/python"
export PATH="$ROOT/.venv/bin:$PATH"
OUT="$ROOT/demo_output"
mkdir -p "$OUT"

echo "[demo] 1/2 generating 8 synthetic BraTS cases (96x96x64, 1 mm) in $OUT/raw"
"$PY" scripts/make_synthetic.py --out_dir "$OUT/raw" --num_cases 8 --shape "[96,96,64]" --spacing "[1,1,1]" --seed 0 --label_noise 0.5

echo "[demo] 2/2 validating, planning and preprocessing into $OUT/work"
"$PY" scripts/prepare_data.py --dataset_dir "$OUT/raw" --work_dir "$OUT/work" --num_folds 2 --seed 0 \
  --patch_size "[48,48,48]" --filters "[8,16,32,64]"

echo "[demo] done: outputs under $OUT"
