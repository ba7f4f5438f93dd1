#!/usr/bin/env bash
# The user's path on a VOC-layout root, with only the overrides a user must give (data.root, out_dir)
# plus tiny iteration counts at training time; the commands after training read the run they are given.
#   tests/commands/user_path.sh WORK_DIR      (PYTHON=... to choose the interpreter; run from the repository root)
set -euo pipefail
WORK=$1
PY=${PYTHON:-python}
ROOT=$WORK/VOC2012
RUN=$WORK/runs/afa
RUN2=$WORK/runs/second
PL=$WORK/pseudo_train
wsss() { "$PY" -m wsss.cli "$@"; }
TINY=(train.max_iters=4 train.log_every=1 train.ckpt_every=2 data.crop_size=64 data.batch_size=2
      pseudo.warmup_iters=1 afa.switch_iter=2 eval.max_images=4)

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

# Real photographs (msrc_dev beside the repository; skipped when absent) as a folder dataset: a labels
# CSV built from the masks (negatives included: photos without any object), a held-out val part,
# photos read in place from msrc_dev; calibrate on 20 masks, then evaluate, pseudo-labels, predict.
MSRC=${MSRC_DEV:-$(cd "$(dirname "$0")/../.." && pwd)/../shared/data/msrc_dev}
if [ -d "$MSRC" ]; then
  OWN=$WORK/own
  mkdir -p "$OWN/masks20"
  NAMES=$("$PY" - "$MSRC" "$OWN" <<'PYEOF'
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
msrc, own = Path(sys.argv[1]), Path(sys.argv[2])
names = json.loads((msrc / "class_names.json").read_text())
rows, neg = [], 0
for stem in (msrc / "ImageSets/Segmentation/all.txt").read_text().split()[::6]:  # every class
    ids = sorted(set(np.unique(np.asarray(Image.open(msrc / "SegmentationClass" / f"{stem}.png")))) - {0, 255})
    if not ids and neg >= 6:
        continue
    neg += not ids
    rows.append(f"{stem},{';'.join(names[i] for i in ids)}")
    if len(rows) == 60:
        break
(own / "labels.csv").write_text("name,labels\n" + "\n".join(rows) + "\n")
print("[" + ",".join(names[1:]) + "]")
PYEOF
)
  OWN_DATA=(data.type=folder data.image_dir="$MSRC/JPEGImages" data.mask_dir="$MSRC/SegmentationClass"
            data.labels_file="$OWN/labels.csv" data.class_names="$NAMES" data.val_fraction=0.34)
  wsss train cam_mit_tiny_synthetic "${OWN_DATA[@]}" out_dir="$OWN/run" train.max_iters=2 train.log_every=1 \
    data.crop_size=64 data.batch_size=2 eval.batch_size=1 eval.max_images=null par.num_iter=2 \
    cam.scales=[1.0] --threads 1 > "$WORK/own_train.out"
  grep -q "held out of the labels file" "$WORK/own_train.out"
  "$PY" -c "import json,shutil,sys; [shutil.copy(f'$MSRC/SegmentationClass/{n}.png', '$OWN/masks20')
for n in json.load(open('$OWN/run/split.json'))['val'][:20]]"
  wsss calibrate --checkpoint "$OWN/run" --masks "$OWN/masks20" --thresholds 0.2 0.4 0.6 > "$WORK/own_calibrate.out"
  wsss evaluate --checkpoint "$OWN/run/model" --out "$OWN/eval.json" > "$WORK/own_evaluate.out"
  wsss pseudo-labels --checkpoint "$OWN/run/model" --split val --out "$OWN/pl" > "$WORK/own_pseudo.out"
  mkdir -p "$OWN/photos"
  "$PY" -c "import json,os; [os.symlink(f'$MSRC/JPEGImages/{n}.jpg', f'$OWN/photos/{n}.jpg')
for n in json.load(open('$OWN/run/split.json'))['val'][:8]]"
  wsss predict --checkpoint "$OWN/run/model" "$OWN/photos" --out "$OWN/predict" > "$WORK/own_predict.out"
  "$PY" -c "import json; c = json.load(open('$OWN/run/calibration.json'))['values']
assert json.load(open('$OWN/eval.json'))['_protocol']['calibration']['values'] == c
s = json.load(open('$OWN/pl/summary.json')); assert (s['high'], s['low']) == (c['cam.high'], c['cam.low'])"
fi
echo "user path done"
