#!/usr/bin/env bash
# The GPU figures issue 5 still needs, in stages that each fit one device call (timeout near 570 s). Each log goes
# to ${OUT:-/tmp} as soon as its step ends, so a run cut short keeps the rest.
#   bash benchmarks/gpu_check.sh            # stage "calls" (about 7 min with the autotuned compile)
#   bash benchmarks/gpu_check.sh epoch MODE # stage "epoch" with algo.compile_mode=MODE (default: default; about 5
#                                           # min, more when MODE autotunes: run it where unet_mfu says it pays)
# Measured on an H100 on 2026-11-26 (benchmarks/README.md): a whole T = 50 iteration at the reference batch,
# micro-batch 16 x 1, compiled, reached 29.1% training MFU against the 30% target, with the training loop adding
# nothing to its primitives (0.98); the compiled 32-row call ran at 197.6 ms (28.8%) in that run, against 188.6 ms
# (30.5%) alone in unet_mfu.py on another H100. What is left is the call itself.
# Stage "calls":
#   1. the tests that need CUDA (the fused-vs-foreach AdamW test under 16-mixed was fixed after that session);
#   2. unet_mfu.py: the compiled 32-row training call alone on this machine, with inductor's default mode and with
#      max-autotune-no-cudagraphs (algo.compile_mode: kernel choices benchmarked while compiling, minutes more).
# Stage "epoch": epoch.py at the settings (T = 50, the reference batch, micro-batch 16 x 1, 16 prompts per
#   sampling call, compiled, cuDNN autotuning, bf16 base): per-phase times, overhead ratio and training MFU, now with
#   sample grids of at most 256-px cells (the last run's final grid took about 4 s of its 5.9 s of logging). Two
#   graphs compile in the warm-up iteration (about 2 min each by default), then one timed iteration (about 35 s).
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
stage=${1:-calls}
mode=${2:-default}
if [[ $stage == calls ]]; then
  timeout 100 python3 -m pytest -q -rA -p no:cacheprovider -k "cuda or 16_mixed" tests/unit/test_model_rewards.py \
    tests/unit/test_steps.py tests/unit/test_optimizer.py tests/integration/test_overlap.py \
    > "$out/pytest_cuda.log" 2>&1
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED)" "$out/pytest_cuda.log"; tail -1 "$out/pytest_cuda.log"
  echo "=== unet_mfu.py: the compiled 32-row training call, default mode and max-autotune-no-cudagraphs"
  timeout 420 python3 benchmarks/unet_mfu.py train:32:bm:full train:32:bm:full:autotune 2>&1 | quiet \
    | tee "$out/unet_mfu_32.log"
elif [[ $stage == epoch ]]; then
  echo "=== epoch.py: T = 50, micro-batch 16, sampling batch 16, compile ($mode), cuDNN autotuning, bf16 base"
  timeout 540 python3 benchmarks/epoch.py --preset sd_turbo --models "$models" --warmup 1 --iterations 1 \
    --repeats 3 algo.num_steps=50 algo.micro_batch_pairs=16 algo.gradient_accumulation_steps=1 \
    algo.sample_batch_size=16 algo.compile=true "algo.compile_mode=$mode" trainer.benchmark=true \
    algo.low_precision_base=true algo.overlap_scoring=false > "$out/epoch_t50_micro16_compile.log" 2>&1
  grep -v -i warn "$out/epoch_t50_micro16_compile.log" | sed -n '/SDPO iteration benchmark/,$p'
  grep -E "Error|error:" "$out/epoch_t50_micro16_compile.log" | tail -5
else
  echo "unknown stage $stage: use calls, or epoch [default|max-autotune-no-cudagraphs]" >&2; exit 2
fi
