"""Update-rule invariants: an optimizer step covers the same pairs whatever the micro-batch x accumulation split,
the sharded shuffle is the union of per-rank shuffles, and frozen parts never hold gradients."""

from __future__ import annotations

import pytest
import torch

from sdpo.algo.shuffle import sharded_update_order, update_groups
from sdpo.config_checks import ConfigError, validate_config
from sdpo.policy.fused_lora import has_fused_lora
from sdpo.policy.speed import REGIONAL_BLOCKS
from sdpo.train_run import train
from tests.conftest import FAST, assert_weights_match, compose, trainable_state


def steps_as_sets(groups) -> list[set[tuple[int, int]]]:
    """Each optimizer step as the set of (pair, step) it trains on."""
    return [{(int(p), int(s)) for idx, steps in group for p, s in zip(idx, steps, strict=True)} for group in groups]


@pytest.mark.parametrize("num_pairs", [8, 6])  # 6: every column ends with a smaller group
def test_optimizer_steps_depend_only_on_the_product(num_pairs):
    def plan(micro: int, accum: int):
        orders, step_order = sharded_update_order(num_pairs, 4, [torch.Generator().manual_seed(5)])
        return update_groups(orders, step_order, micro, accum)

    reference = steps_as_sets(plan(4, 1))
    for micro, accum in [(2, 2), (1, 4)]:
        groups = plan(micro, accum)
        assert steps_as_sets(groups) == reference
        assert all(len(idx) <= micro for group in groups for idx, _ in group)
    assert len(reference) == 4 * -(-num_pairs // 4)  # T columns x groups per column
    assert {pair for group in reference for pair, _ in group} == set(range(num_pairs))


def test_shards_reproduce_the_ranks_micro_batches():
    """One process with 2 shards and micro-batch 2m trains, micro-batch by micro-batch, on the union of what two
    ranks with micro-batch m train on (rank r's pairs are global pairs r*S .. (r+1)*S-1)."""
    size, steps = 5, 3
    seeds = [torch.Generator().manual_seed(s) for s in (11, 12)]
    united = update_groups(*sharded_update_order(size, steps, seeds), pairs_per_shard=2, accumulation=2)
    per_rank = []
    for rank, seed in enumerate((11, 12)):
        orders, step_order = sharded_update_order(size, steps, [torch.Generator().manual_seed(seed)])
        per_rank.append([[(idx + rank * size, s) for idx, s in group]
                         for group in update_groups(orders, step_order, 2, 2)])
    assert len(united) == len(per_rank[0]) == len(per_rank[1])
    for k, group in enumerate(united):
        for j, (idx, s) in enumerate(group):
            assert torch.equal(idx, torch.cat([per_rank[0][k][j][0], per_rank[1][k][j][0]]))
            assert torch.equal(s, torch.cat([per_rank[0][k][j][1], per_rank[1][k][j][1]]))



def test_micro_batch_times_accumulation_gives_the_same_update(tmp_path, cache_dir):
    """4 x 1, 2 x 2 and 1 x 4 pairs per optimizer step: the same LoRA weights after an iteration.

    AdamW with eps=1: with 1e-8, m/sqrt(v) turns the rounding noise of near-zero gradients (summed in another
    order) into full ±lr steps; with eps=1 the update is a smooth function of the gradient.
    """
    base = [*FAST, "model.lora.enabled=true", "optim.lr=0.1", "optim.eps=1.0", "trainer.max_epochs=1",
            "++callbacks.eval=null", "data.prompts_per_batch=6"]
    runs = {}
    for micro, accum in [(4, 1), (2, 2), (1, 4)]:
        cfg = compose([*base, f"algo.micro_batch_pairs={micro}", f"algo.gradient_accumulation_steps={accum}"],
                      tmp_path / f"{micro}x{accum}", cache_dir)
        trainer = train(cfg)
        runs[(micro, accum)] = trainable_state(trainer.lightning_module)
        assert float(trainer.callback_metrics["train/optimizer_steps"]) == 4 * 2  # T x (a group of 4, one of 2)
    reference = runs[(4, 1)]
    moved = max(float(w.abs().max()) for n, w in reference.items() if "lora_B" in n)  # B starts at 0
    assert moved > 100 * 1e-6  # it trained, by far more than the comparison's tolerance
    for split, weights in runs.items():
        assert_weights_match(weights, reference, atol=1e-6, label=str(split))

    # frozen parts never hold gradients (nor the UNet's base weights under LoRA)
    module = trainer.lightning_module
    for part in (module.vae, module.text_encoder, module.reward_fn, module.unet):
        for name, p in part.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, name
    assert not any(p.requires_grad for part in (module.vae, module.text_encoder) for p in part.parameters())


@pytest.fixture(scope="module")
def plain_update(tmp_path_factory, cache_dir) -> dict[str, torch.Tensor]:
    trainer = train(compose(MEMORY_OPTION_BASE, tmp_path_factory.mktemp("plain"), cache_dir))
    assert has_fused_lora(trainer.lightning_module.unet)  # the default, algo.fused_lora=auto, in an eager run
    return trainable_state(trainer.lightning_module)


MEMORY_OPTION_BASE = [*FAST, "model.lora.enabled=true", "optim.lr=0.1", "optim.eps=1.0", "trainer.max_epochs=1",
                      "++callbacks.eval=null"]


@pytest.mark.parametrize("option", ["model.gradient_checkpointing=true", "algo.channels_last=true",
                                    pytest.param("algo.compile=regional", marks=pytest.mark.slow),
                                    "optim.fused=true", "algo.fused_lora=false"])
def test_speed_and_memory_options_leave_the_update_unchanged(option, plain_update, tmp_path, cache_dir):
    """Recomputing activations in backward, another memory layout, compiled blocks, the fused AdamW or PEFT's own
    LoRA forward (the default runs the fused one) must train the same weights (and keep the plain UNet's parameter
    names, which checkpoints and LoRA files use)."""
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # aot_eager: dynamo's capture and AOT autograd as with inductor, without minutes of C++ kernel builds on CPU
    extra = ["algo.compile_backend=aot_eager"] if option.startswith("algo.compile") else []
    trainer = train(compose([*MEMORY_OPTION_BASE, option, *extra], tmp_path, cache_dir))
    unet = trainer.lightning_module.unet
    if option.startswith("model.gradient"):
        assert unet.is_gradient_checkpointing
    elif option.startswith("algo.channels_last"):
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    elif option.startswith("optim.fused"):
        assert trainer.optimizers[0].defaults["fused"]  # the plain run's, on a CPU: foreach
    elif option.startswith("algo.fused_lora"):
        assert not has_fused_lora(unet)  # the plain run's are fused (the plain_update fixture checks)
    else:
        compiled = {type(m).__name__ for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None}
        assert compiled == set(REGIONAL_BLOCKS)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before  # it really compiled
    weights = trainable_state(trainer.lightning_module)
    assert weights.keys() == plain_update.keys()
    moved = max(float(v.abs().max()) for n, v in weights.items() if "lora_B" in n)  # B starts at 0
    assert moved > 100 * 1e-5  # it trained, by far more than the comparison's tolerance
    assert_weights_match(weights, plain_update, atol=1e-5, label=option)


def test_low_precision_base_trains_what_autocast_trains(tmp_path, cache_dir):
    """Frozen Linear/Conv2d weights stored in bf16 give the update of autocast casting fp32 ones on every call; the
    held-out evaluation (outside autocast) still runs on the mixed-dtype UNet."""
    base = [*FAST, "model.lora.enabled=true", "optim.lr=0.1", "optim.eps=1.0", "trainer.max_epochs=2",
            "trainer.precision=bf16-mixed", "callbacks.eval.every_n_epochs=2", "callbacks.eval.steps=[1,2]"]
    runs = {}
    for low in (False, True):
        trainer = train(compose([*base, f"algo.low_precision_base={str(low).lower()}"], tmp_path / str(low),
                                cache_dir))
        runs[low] = trainer
    unet = runs[True].lightning_module.unet
    dtypes = {type(m).__name__: {p.dtype for p in m.parameters(recurse=False)} for m in unet.modules()
              if any(True for _ in m.parameters(recurse=False))}
    assert dtypes["Conv2d"] == {torch.bfloat16} and dtypes["GroupNorm"] == {torch.float32}
    lora = [p for n, p in unet.named_parameters() if "lora" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    frozen_linear = [m.weight for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and "lora" not in n]
    assert frozen_linear and all(w.dtype == torch.bfloat16 for w in frozen_linear)
    plain, low = (trainable_state(runs[k].lightning_module) for k in (False, True))
    assert max(float(v.abs().max()) for n, v in plain.items() if "lora_B" in n) > 1e-2  # it trained
    assert_weights_match(low, plain, atol=0)  # the same roundings: equal, not merely close
    for key in ("train/reward_1step", "train/reward_last"):
        assert float(runs[True].callback_metrics[key]) == float(runs[False].callback_metrics[key])
    evaluated = [k for k in runs[True].callback_metrics if k.startswith("eval/")]
    assert evaluated
    for key in evaluated:  # bf16 layers outside autocast against fp32 ones: close, not equal
        assert float(runs[True].callback_metrics[key]) == pytest.approx(float(runs[False].callback_metrics[key]),
                                                                         abs=2e-2), key


def test_low_precision_base_needs_autocast_and_a_frozen_base(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.precision=32-true has no autocast"):
        validate_config(compose(["algo.low_precision_base=true", "model.lora.enabled=true"], tmp_path, tmp_path))
    with pytest.raises(ConfigError, match=r"needs a frozen base \(model.lora.enabled=true\)"):
        validate_config(compose(["algo.low_precision_base=true", "model.lora.enabled=false",
                                 "trainer.precision=bf16-mixed"], tmp_path, tmp_path))
    try:
        validate_config(compose(["algo.low_precision_base=true", "model.lora.enabled=true",
                                 "trainer.precision=16-mixed", "trainer.accelerator=gpu"], tmp_path, tmp_path))
    except ConfigError as error:  # a machine without a GPU refuses the accelerator, and only that
        assert "this machine has no GPU" in str(error) and "low_precision_base" not in str(error)
