#!/usr/bin/env bash
# Every GPU figure issue 5 asks for, in one run (8-10 minutes on an H100/H200; logs go to ${OUT:-/tmp}, each
# as soon as it is done, and torch.compile runs last, so a run cut short by the device limit keeps the rest):
#   1. the reference per-GPU batch (8 x 4 prompt pairs, micro-batch 2 x 8, LoRA r4, bf16) at SD-Turbo sizes:
#      peak memory (the 24 GB target), per-phase times, overhead ratio, MFU of sampling and training;
#   2-4. 8 pairs per iteration at training micro-batch 8 (the same update as 2 x 4, tested): plain, channels_last,
#      torch.compile (its compile time falls in the warm-up iteration). These aim at the training-MFU target.
#   5. the tests that need CUDA.
# T = 10 instead of 50 keeps an iteration near 30 s: the per-call overhead and MFU do not depend on T, and the memory
# peak depends on it only through the stored trajectory (32 pairs x 51 latents x 64 KiB = 0.2 GiB at T = 50).
# Packages the machine lacks can be put as wheels in .whl/ (installed with --no-deps into a scratch site dir).
set -uo pipefail
out=${OUT:-/tmp}
models=/tmp/sdpo-bench-models
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
bench() {  # name, then epoch.py arguments
  local name=$1; shift
  echo "=== $name: $*"
  python3 benchmarks/epoch.py --preset sd_turbo --models "$models" --warmup 1 --iterations 1 --repeats 3 \
    algo.num_steps=10 "$@" > "$out/epoch_$name.log" 2>&1
  grep -v -i warn "$out/epoch_$name.log" | sed -n '/SDPO iteration benchmark/,$p'
}
bench reference_batch
micro8=(data.batches_per_epoch=1 algo.micro_batch_pairs=8 algo.gradient_accumulation_steps=1)
bench micro8 "${micro8[@]}"
bench micro8_channels_last "${micro8[@]}" algo.channels_last=true
bench micro8_compile "${micro8[@]}" algo.compile=true
python3 -m pytest -q -p no:cacheprovider tests/unit/test_model_rewards.py tests/unit/test_steps.py \
  > "$out/pytest_cuda.log" 2>&1; tail -3 "$out/pytest_cuda.log"
