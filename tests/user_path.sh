#!/usr/bin/env bash
# The user's path on a VOC-layout root, with only the overrides a user must give (data.root, out_dir)
# plus tiny iteration counts at training time; the commands after training read the run they are given.
#   tests/user_path.sh WORK_DIR      (PYTHON=... to choose the interpreter; run from the repository root)
set -euo pipefail
WORK=$1
PY=${PYTHON:-python}
ROOT=$WORK/VOC2012
RUN=$WORK/runs/afa
RUN2=$WORK/runs/second
PL=$WORK/pseudo_train
wsss() { "$PY" -m wsss.cli "$@"; }
TINY=(train.max_iters=4 train.log_every=1 train.ckpt_every=2 data.crop_size=64 data.batch_size=2
      afa.warmup_iters=1 afa.switch_iter=2 eval.max_images=4)

# A VOC-layout root with VOC's 21 classes and no class_names.json, like PASCAL VOC itself.
"$PY" -m wsss.data.synthetic "$ROOT" --num-train 6 --num-val 3 --size 64 --num-classes 21 > /dev/null
rm "$ROOT/class_names.json"

wsss train afa_mit_tiny_synthetic data.root="$ROOT" out_dir="$RUN" "${TINY[@]}" --threads 1 \
  > "$WORK/train.out"
wsss evaluate --checkpoint "$RUN/model" > "$WORK/evaluate.out"
wsss pseudo-labels --checkpoint "$RUN/model" --split train --out "$PL" > "$WORK/pseudo.out"
wsss train second_stage_mit_tiny_synthetic data.root="$ROOT" data.pseudo_dir="$PL" out_dir="$RUN2" \
  "${TINY[@]}" > "$WORK/train2.out"
wsss evaluate --checkpoint "$RUN2/model" > "$WORK/evaluate2.out"
wsss predict --checkpoint "$RUN2/model" "$ROOT/JPEGImages" --out "$WORK/predict" > "$WORK/predict.out"
wsss analyze --checkpoint "$RUN/model" --out "$WORK/analysis" > "$WORK/analyze.out"
wsss report "$RUN" --images 2 > "$WORK/report.out"
echo "user path done"
