#!/usr/bin/env bash
# The main job end to end on the built-in synthetic data, at tiny (CPU) size:
# synthetic BraTS set -> validation, planning, preprocessing -> 2-fold cross-validation of three variants
# (with uncertainty, without, MC dropout) through `python -m monai.bundle run training` -> report (Tables 1-2,
# Figures 1-2) and held-out quality vs cost -> bundle inference on new cases -> official-style evaluation ->
# TorchScript/ONNX export with parity -> a real Triton server answering HTTP and gRPC.
# Everything it makes goes under demo_output/. Re-running it skips finished training runs.
# ANATOMY=mni152 bash scripts/demo.sh runs it all on cases with real brain anatomy (MNI152 template, deformed
# per case) instead of the smooth synthetic head (ANATOMY=blob, the default); DEMO_OUTPUT=DIR moves the output.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_venv.sh
PY="$ROOT/.venv/bin/python"
export PATH="$ROOT/.venv/bin:$PATH"
export PYTHONUNBUFFERED=1
ANATOMY="${ANATOMY:-blob}"
OUT="${DEMO_OUTPUT:-$ROOT/demo_output}"
RAW="$OUT/raw"
NEW="$OUT/new_cases"
W="$OUT/work"
R="$OUT/report"
mkdir -p "$OUT"
step() { echo; echo "[demo] $*"; }

step "1/8 generating 10 synthetic BraTS training cases ($ANATOMY, 64x64x48, 1 mm) in $RAW and 2 unseen cases in $NEW"
"$PY" scripts/make_synthetic.py --out_dir "$RAW" --num_cases 10 --shape "[64,64,48]" --spacing "[1,1,1]" --seed 0 --label_noise 0.5 --anatomy "$ANATOMY"
"$PY" scripts/make_synthetic.py --out_dir "$NEW" --num_cases 2 --shape "[64,64,48]" --spacing "[1,1,1]" --seed 1 --label_noise 0.5 --anatomy "$ANATOMY" \
  --id_offset 100  # unseen cases get their own ids, never a training case's

step "2/8 validating, planning (tiny plan: patch 32^3, filters 8..64) and preprocessing into $W"
"$PY" scripts/prepare_data.py --dataset_dir "$RAW" --work_dir "$W" --num_folds 2 --seed 0 \
  --patch_size "[32,32,32]" --filters "[8,16,32,64]"

# The tiny config (2 epochs) is sized for tests; the demo trains it longer so the tables mean something.
DEMO_TRAINING="${DEMO_TRAINING:-{\"num_epochs\": 20, \"iterations_per_epoch\": 16, \"val_interval\": 2}}"
step "3/8 2-fold cross-validation of the variants unc, baseline and mcdropout (tiny config + $DEMO_TRAINING, monai.bundle run training)"
"$PY" scripts/cross_validate.py --work_dir "$W" --folds "[0,1]" --variants "[unc,baseline,mcdropout]" --config tiny \
  --overrides "$DEMO_TRAINING"

step "4/8 held-out evaluation (unc_output vs var1shot, TTA, MC dropout, ensemble) and the report"
"$PY" scripts/evaluate_heldout.py --work_dir "$W" --out_dir "$R" --mc_samples 10
"$PY" scripts/report.py --work_dir "$W" --out_dir "$R" --config tiny --overrides "$DEMO_TRAINING"

CKPT="$W/runs/unc/fold0/model_final.pt"
step "5/8 bundle inference on unseen cases with $CKPT, P(error) calibrated by the held-out evaluation"
"$PY" -m monai.bundle run --bundle_root bundle --config_file bundle/configs/inference.json \
  --dataset_dir "$NEW" --output_dir "$OUT/predictions" --checkpoint "$CKPT" --calibration_file "$R/calibration.json"

step "6/8 evaluating those predictions (legacy and BraTS 2023 lesion-wise metrics, uncertainty quality)"
"$PY" scripts/evaluate.py --pred_dir "$OUT/predictions" --gt_dir "$NEW" --out_dir "$OUT/evaluation" \
  --unc_dir "$OUT/predictions"

step "7/8 exporting TorchScript + ONNX (parity checked) and the Triton model repository"
"$PY" scripts/export.py --checkpoint "$CKPT" --out_dir "$OUT/models" --triton_repo "$OUT/triton_models"

step "8/8 serving with a real tritonserver on 127.0.0.1 and querying it over gRPC and HTTP"
HTTP_PORT="${DEMO_HTTP_PORT:-18000}"; GRPC_PORT="${DEMO_GRPC_PORT:-18001}"; METRICS_PORT="${DEMO_METRICS_PORT:-18002}"
"$PY" scripts/serve_triton.py --model_repository "$OUT/triton_models" --http_port "$HTTP_PORT" \
  --grpc_port "$GRPC_PORT" --metrics_port "$METRICS_PORT" > "$OUT/triton_server.log" 2>&1 &
SERVER_PID=$!
trap 'kill -TERM $SERVER_PID 2>/dev/null || true; wait $SERVER_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  grep -q "\[serve_triton\] ready" "$OUT/triton_server.log" && break
  kill -0 "$SERVER_PID" 2>/dev/null || { tail -40 "$OUT/triton_server.log"; exit 1; }
  sleep 1
done
grep -q "\[serve_triton\] ready" "$OUT/triton_server.log" || { echo "[demo] Triton not ready after 300 s"; exit 1; }
"$PY" scripts/triton_infer.py --url "127.0.0.1:$GRPC_PORT" --protocol grpc --input_dir "$NEW" \
  --output_dir "$OUT/triton_grpc" --concurrency 4
"$PY" scripts/triton_infer.py --url "127.0.0.1:$HTTP_PORT" --protocol http --input_dir "$NEW" \
  --output_dir "$OUT/triton_http" --concurrency 4
kill -TERM "$SERVER_PID"; wait "$SERVER_PID" || true; trap - EXIT

echo
echo "[demo] done. Look at:"
echo "  $R/report.md                      Tables 1-2, held-out self-assessment, figures; $R/calibration.json"
echo "  $OUT/predictions/                 <case_id>.nii.gz labels, <case_id>-unc.nii.gz uncertainty, <case_id>-perror.nii.gz"
echo "                                    calibrated P(error); summary.json with each case's predicted WT Dice"
echo "  $OUT/evaluation/per_case.csv      legacy and lesion-wise metrics"
echo "  $OUT/models/                      model.ts, model.onnx"
echo "  $OUT/triton_grpc/ $OUT/triton_http/   the same predictions served by Triton"
