#!/usr/bin/env bash
# Every GPU figure issue 5 asks for, in one run (about 6 minutes on an H100/H200; writes into ${OUT:-/tmp}):
#   1. the reference per-GPU batch (8 x 4 prompt pairs, micro-batch 2 x 8, LoRA r4, bf16) at SD-Turbo sizes:
#      peak memory (the 24 GB target), per-phase times, overhead ratio, MFU of sampling and training;
#   2. the same iteration with training micro-batch 8 x 2 (the same update, tested): the training MFU target;
#   3. the tests that need CUDA.
# T = 10 instead of 50 keeps each iteration near 30 s: the per-call overhead and MFU do not depend on T, and the
# memory peak depends on it only through the stored trajectory (32 pairs x 51 latents x 64 KiB = 0.2 GiB at T = 50).
# Packages the machine lacks can be put as wheels in .whl/ (installed with --no-deps into a scratch site dir).
set -euo pipefail
out=${OUT:-/tmp}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
python3 benchmarks/epoch.py --preset sd_turbo --warmup 1 --iterations 1 --repeats 3 algo.num_steps=10 \
  2>&1 | tee "$out/epoch_reference_batch.log" | grep -v -i warn | tail -40
python3 benchmarks/epoch.py --preset sd_turbo --warmup 1 --iterations 1 --repeats 3 algo.num_steps=10 \
  algo.micro_batch_pairs=8 algo.gradient_accumulation_steps=2 \
  2>&1 | tee "$out/epoch_micro8.log" | grep -v -i warn | tail -40
python3 -m pytest -q -p no:cacheprovider tests/unit/test_model_rewards.py tests/unit/test_steps.py \
  2>&1 | tee "$out/pytest_cuda.log" | tail -3
