#!/usr/bin/env bash
# GPU check of reconstruction speed and memory, at most 10 minutes on one GPU (each part has its own time limit).
#   here:            make gpu-carry      (wheels of hydra-core, omegaconf, antlr4 + Fashion-MNIST into outputs/gpu)
#   on the GPU box:  bash benchmarks/gpu_check.sh      (with outputs/gpu carried along, no package index)
# 1. the default job (resnet20_fmnist, PD-Quant W4A4, 1,024 images, 200 steps per unit, 50 DC steps) on
#    trainer=gpu: qdrop, pdquant, pdquant again on the DC cache; then pdquant with trainer.precision=bf16-mixed;
# 2. ResNet-18 at 224x224 with random weights on synthetic images (256, 200 steps per unit, 50 DC steps),
#    qdrop and pdquant;
# 3. memory at the paper's scale: ResNet-18 at 224x224, 1,024 images, PD-Quant, planned against measured peak
#    GPU memory, float32 caches on the GPU and in page-locked host memory (benchmarks/scale.py).
# Prints per-step times and their floor, peak memory and the PD-Quant/QDrop ratio; the JSON files go to
# $OUT (default outputs/gpu_check). wandb is not installed: the runs log nothing (logger=none).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=outputs/gpu
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
if ! python -c "import hydra, omegaconf" 2>/dev/null; then
  python -m pip install -q --no-index --find-links "$CARRY/wheels" hydra-core omegaconf
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
FMNIST="data.root=$CARRY/fashion-mnist"
timeout 210 python benchmarks/methods.py --out "$OUT/default.json" trainer=gpu "$FMNIST"
timeout 90 python benchmarks/methods.py --methods pdquant --out "$OUT/default_bf16.json" \
  --cache-dir "$OUT/default_cache" trainer=gpu trainer.precision=bf16-mixed "$FMNIST" || echo "bf16 part: exit $?"
python -c "import torch, torchvision; torch.manual_seed(0); torch.save(torchvision.models.resnet18().state_dict(), '$OUT/resnet18_random.pt')"
timeout 170 python benchmarks/methods.py --methods qdrop pdquant --model resnet18 --calib-size 256 \
  --out "$OUT/resnet18.json" trainer=gpu data=synthetic "model.checkpoint=$OUT/resnet18_random.pt" \
  model.ptq.dc_steps=50 calib.act_init_size=256
timeout 80 python benchmarks/scale.py --models resnet18 --images 1024 --out "$OUT/scale.json" trainer=gpu \
  || echo "scale part: exit $?"
timeout 40 python benchmarks/scale.py --models resnet18 --images 1024 --out "$OUT/scale_cpu_caches.json" \
  trainer=gpu calib.cache_device=cpu || echo "scale part (host caches): exit $?"
