#!/usr/bin/env bash
# The GPU figures issue 5 still needs, most needed first (give the device call a timeout near 590 s; steps 3-4
# need a second call). Each log goes to ${OUT:-/tmp} as soon as its step ends, so a run cut short keeps the rest:
#   1. the tests that need CUDA, among them the background scorer on a CUDA side stream (algo.overlap_scoring),
#      check flags read late from pinned memory (a LoRA run's training loop) and the fused AdamW under 16-mixed;
#   2. epoch.py at the settings, T = 50 and the reference per-GPU batch (8 x 4 prompt pairs, LoRA r4, bf16),
#      trained in micro-batches of 16 pairs (the same update as the reference's 2 x 8, tested) and sampled 16 prompts
#      per call (no sample changes, tested): both UNet calls have 32 rows, each its own static graph. The whole UNet
#      compiled, NCHW weights, cuDNN autotuning, frozen base layers stored in bf16 (algo.low_precision_base: the
#      same update, tested, without autocast's per-call casts of 866 M weights; the isolated unet_mfu.py call that
#      reached 30.5% used bf16 weights too): per-phase times, overhead ratio and the training phase's MFU (target 30%).
#      When step 1's CUDA background-scorer test passed, the first 16 prompts are scored while the next 16 sample
#      (algo.overlap_scoring=true); "sampling + rewards" against its primitives then says what the overlap hid. Two graphs compile (sampling,
#      training; about 2 min each on an H100) in the warm-up iteration, then two iterations of about 40 s run.
#      "training" against its primitives (the compiled call alone, and clip + AdamW) says what the loop adds: the
#      LoRA loop no longer waits on the GPU once per optimizer step (sdpo/algo/checked_steps.py);
#   3. unet_mfu.py, eager: the LoRA training forward+backward at 32 and 64 rows, cuDNN autotuning ("bm"), and
#      sampling forwards of 32 and 64 rows (algo.sample_batch_size changes no sample: tested);
#   4. unet_mfu.py: regional compilation at 32 rows (its compile time and speed against step 2's).
# The reference micro-batch of 2 (11.9 GiB peak, overhead ratio 1.15 at T = 5) and the eager / channels_last sweep
# were measured on 2026-11-26 (benchmarks/README.md) and are not repeated.
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
timeout 120 python3 -m pytest -q -rA -p no:cacheprovider tests/unit/test_model_rewards.py tests/unit/test_steps.py \
  tests/unit/test_optimizer.py "tests/integration/test_overlap.py::test_background_scorer_on_each_device" \
  > "$out/pytest_cuda.log" 2>&1
grep -E "^(FAILED|ERROR)" "$out/pytest_cuda.log"; tail -1 "$out/pytest_cuda.log"
overlap=(algo.overlap_scoring=false)
if grep -q "PASSED tests/integration/test_overlap.py::test_background_scorer_on_each_device\[cuda\]" \
  "$out/pytest_cuda.log"; then overlap=(algo.overlap_scoring=true); fi
echo "=== epoch.py: T = 50, micro-batch 16, compile, cuDNN autotuning, bf16 base, ${overlap[*]}"
timeout 440 python3 benchmarks/epoch.py --preset sd_turbo --models "$models" --warmup 1 --iterations 1 --repeats 3 \
  algo.num_steps=50 algo.micro_batch_pairs=16 algo.gradient_accumulation_steps=1 algo.sample_batch_size=16 \
  algo.compile=true trainer.benchmark=true algo.low_precision_base=true "${overlap[@]}" \
  > "$out/epoch_t50_micro16_compile.log" 2>&1
grep -v -i warn "$out/epoch_t50_micro16_compile.log" | sed -n '/SDPO iteration benchmark/,$p'
timeout 150 python3 benchmarks/unet_mfu.py train:32 train:32:bm train:64 train:64:bm sample:16:bm sample:32 sample:64 2>&1 | quiet \
  | tee "$out/unet_mfu.log"
timeout 150 python3 benchmarks/unet_mfu.py train:32:bm:regional 2>&1 | quiet | tee "$out/unet_mfu_regional.log"
