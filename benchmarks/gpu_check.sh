#!/usr/bin/env bash
# The GPU figures issue 5 still needs, most needed first, in one device call of about 9 minutes (timeout near 570 s).
# Each log goes to ${OUT:-/tmp} as soon as its step ends, so a run cut short keeps the rest:
#   1. the tests that need CUDA: the background scorer on a CUDA side stream (algo.overlap_scoring), check flags
#      read late from pinned memory (a LoRA run's training loop), the fused AdamW under Lightning's 16-mixed and the
#      CLIP rewards moved to CUDA;
#   2. epoch.py at the settings, T = 50 and the reference per-GPU batch (8 x 4 prompt pairs, LoRA r4, bf16),
#      trained in micro-batches of 16 pairs (the same update as the reference's 2 x 8, tested) and sampled 16 prompts
#      per call (no sample changes, tested): both UNet calls have 32 rows, each its own static graph. The whole UNet
#      compiled, NCHW weights, cuDNN autotuning, frozen base layers stored in bf16 (algo.low_precision_base: the
#      same update, tested, without autocast's per-call casts of 866 M weights). Two graphs compile in the warm-up
#      iteration (about 2 min each on an H100), then one timed iteration (about 35 s). Prints per-phase times, the
#      overhead ratio and the training phase's MFU (target 30%); "training" against its primitives (the compiled
#      call alone, and clip + AdamW) says what the loop adds. The primitives run under the trainer's autocast and
#      refuse to recompile (a recompile would take minutes and time another graph);
#   3. unet_mfu.py: the compiled training call at 64 rows (micro-batch 32 pairs), with cuDNN autotuning: whether a
#      larger micro-batch lifts the call's MFU above the 30.5% of 32 rows.
# Left for a later call: the eager 64-row sweep (unet_mfu.py train:64:bm sample:32 sample:64) and regional
# compilation at 32 rows (train:32:bm:regional). The reference micro-batch of 2 (11.9 GiB peak, overhead ratio 1.15
# at T = 5) and the eager / channels_last sweep were measured on 2026-11-26 (benchmarks/README.md).
# Packages the machine lacks can be put as wheels in .whl/ (installed with --no-deps into a scratch site dir).
set -uo pipefail
out=${OUT:-/tmp}
models=/tmp/sdpo-bench-models
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
quiet() { grep -v -i -E "warn|kept in float32|originates from|is_torch_version|^$"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
timeout 100 python3 -m pytest -q -rA -p no:cacheprovider -k "cuda or 16_mixed" tests/unit/test_model_rewards.py \
  tests/unit/test_steps.py tests/unit/test_optimizer.py tests/integration/test_overlap.py > "$out/pytest_cuda.log" 2>&1
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)" "$out/pytest_cuda.log"; tail -1 "$out/pytest_cuda.log"
echo "=== epoch.py: T = 50, micro-batch 16, sampling batch 16, compile, cuDNN autotuning, bf16 base"
timeout 440 python3 benchmarks/epoch.py --preset sd_turbo --models "$models" --warmup 1 --iterations 1 --repeats 3 \
  algo.num_steps=50 algo.micro_batch_pairs=16 algo.gradient_accumulation_steps=1 algo.sample_batch_size=16 \
  algo.compile=true trainer.benchmark=true algo.low_precision_base=true algo.overlap_scoring=false \
  > "$out/epoch_t50_micro16_compile.log" 2>&1
grep -v -i warn "$out/epoch_t50_micro16_compile.log" | sed -n '/SDPO iteration benchmark/,$p'
grep -E "Error|error:" "$out/epoch_t50_micro16_compile.log" | tail -5
echo "=== unet_mfu.py: compiled training call at 64 rows"
timeout 200 python3 benchmarks/unet_mfu.py train:64:bm:full 2>&1 | quiet | tee "$out/unet_mfu_64.log"
