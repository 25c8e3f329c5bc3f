"""Settings that cannot train fail before any work, with the key to change; sound neighbours still pass."""

from __future__ import annotations

import importlib.util
import signal

import pytest
import torch

from sdpo.config_checks import ConfigError, validate_config
from sdpo.policy.lora import make_trainable
from sdpo.policy.steps import check_training_schedule, make_scheduler, timestep_schedule
from sdpo.rewards import UnscorablePrompts
from sdpo.train_run import train
from tests.conftest import FAST, compose
from tests.unit.test_steps import sd_turbo_like


def problems(overrides: list[str], tmp_path) -> str:
    """The config check's message for ``overrides`` ("" when it passes)."""
    try:
        validate_config(compose(overrides, tmp_path, tmp_path))
    except ConfigError as error:
        return str(error)
    return ""


@pytest.mark.parametrize("overrides,expected", [
    (["algo.num_steps=1"], "algo.num_steps=1: SDPO trains on T >= 2"),
    (["model.spacing=linspace"], "model.spacing=linspace ends every schedule at t=0"),
    (["model.spacing=leading", "model.steps_offset=0"], "use model.steps_offset=1"),
    (["model.lora.enabled=true", "model.lora.alpha=0"], "model.lora.alpha=0: the adapter's output is scaled"),
    (["model.lora.enabled=true", "model.lora.rank=0"], "model.lora.rank=0: need an integer >= 1"),
    (["model.lora.enabled=true", "model.lora.init=pissa"], "model.lora.init='pissa': use gaussian"),
    (["model.lora.enabled=true", "model.lora.init=false"], "model.lora.init=False: use gaussian"),
    (["model.lora.enabled=true", "model.lora.targets=[]"], "model.lora.targets=[]: name at least one module"),
    (["seed=-1"], "seed=-1: use an integer in [0, 2**32)"),
    (["ckpt_path=/no/such/last.ckpt"], "ckpt_path=/no/such/last.ckpt: no such file"),
    # Lightning's own names resolve in this new run's empty folder: it would train from the base model
    (["ckpt_path=last"], "ckpt_path=last: give the checkpoint's path (ckpt_path=outputs/train/<run>/checkpoints/"
                         "last.ckpt); Lightning would look for 'last' only in this run's own folder"),
    (["ckpt_path=best"], "ckpt_path=best: give the checkpoint's path"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0 trains nothing: use a positive limit, or -1"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 trains nothing"),
    # a key added with + that nothing reads (Hydra suggests the + form for any unknown key)
    (["+algo.num_step=8"], "algo.num_step is not a setting (conf/algo/ has no such key; did you mean algo.num_steps?)"),
    (["+model.lora.rnk=4"], "model.lora.rnk is not a setting (conf/model/ has no such key; did you mean "
                            "model.lora.rank?)"),
    (["+trainer.max_epoch=3"], "trainer.max_epoch is not a setting (lightning.Trainer takes no such argument; did "
                               "you mean trainer.max_epochs?)"),
    (["+seeed=1"], "seeed is not a setting (conf/train.yaml has no such key; did you mean seed?)"),
    (["reward=aesthetic", "+reward.clip_modle=x"], "reward.clip_modle is not a setting (reward aesthetic takes no "
                                                   "such argument; did you mean reward.clip_model?)"),
    (["+reward.clip_model=x"], "reward.clip_model is not a setting (reward brightness takes no such argument)"),
    (["reward=multi", "+reward.components.pickscore.procesor=x"], "reward.components.pickscore.procesor is not a "
                                                                  "setting (reward pickscore takes no such argument"),
    (["trainer.accumulate_grad_batches=4"], "set algo.gradient_accumulation_steps instead"),
    (["trainer.gradient_clip_val=0.5"], "set algo.max_grad_norm instead"),
    (["algo.max_grad_norm=0"], "algo.max_grad_norm=0: clipping to 0 would zero every gradient"),
    (["algo.max_grad_norm=-1.0"], "algo.max_grad_norm=-1.0: clipping to -1.0 would"),
    (["algo.decode_batch_size=0"], "algo.decode_batch_size=0: need >= 1"),
    (["algo.tracker.buffer_size=0", "algo.tracker.min_count=0"], "algo.tracker.buffer_size=0: need >= 1"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1: must be >= 0"),
    # wrong types: a string or a float where a count belongs is named before the value checks compare it
    (["algo.num_steps=four"], "algo.num_steps='four': need an integer"),
    (["algo.num_steps=4.5"], "algo.num_steps=4.5: need an integer"),
    (["optim.lr=abc"], "optim.lr='abc': need a number"),
    (["model.resolution=big"], "model.resolution='big': need an integer or null"),
    (["algo.max_grad_norm=yes"], "algo.max_grad_norm='yes': need a number or null"),
    (["algo.fused_lora=peft"], "algo.fused_lora='peft': use auto, true or false"),
    (["algo.compile_layout_optimization=yes"], "algo.compile_layout_optimization='yes': use true or false"),
    (["algo.compile_check=sometimes"], "algo.compile_check='sometimes': use true or false"),
    (["algo.compile_layout_optimization=true"], "algo.compile_layout_optimization=true needs the UNet compiled"),
    (["model.lora.alpha=[8]"], "model.lora.alpha=[8]: need a number or null"),
    (["data.source=my_prompts.txt"], "data.source: prompt source 'my_prompts.txt' is neither a built-in set"),
    (["callbacks.eval.prompts=held_out.txt"], "callbacks.eval.prompts: prompt source 'held_out.txt' is neither"),
    # the callbacks' own argument checks, run before Lightning builds them
    (["callbacks.eval.steps=[0,1]"], "callbacks.eval.steps=[0, 1]: need distinct step counts >= 1"),
    (["callbacks.eval.steps=[1,two]"], "callbacks.eval.steps=[1, 'two']: use a list of integers"),
    (["callbacks.eval.every_n_epochs=abc"], "callbacks.eval.every_n_epochs='abc': use an integer"),
    (["callbacks.sample_grid.max_prompts=0"], "callbacks.sample_grid.every_n_epochs=5 and max_prompts=0: need >= 1"),
    (["callbacks.requeue.signal=FOO"], "callbacks.requeue.signal='FOO': use a signal name such as USR1"),
    (["callbacks.pace.every_seconds=-1"], "callbacks.pace.every_seconds=-1: need a number of seconds >= 0"),
    (["callbacks.pace.every_seconds=often"], "callbacks.pace.every_seconds='often': need a number of seconds"),
])
def test_refused_before_loading(overrides: list[str], expected: str, tmp_path) -> None:
    assert expected in problems(overrides, tmp_path)


@pytest.mark.parametrize("overrides", [
    ["algo.num_steps=2"],
    ["model.spacing=leading", "model.steps_offset=1"],
    ["model.spacing=leading"],  # the scheduler's own offset decides: checked once it is loaded (below)
    ["model.spacing=linspace", "model.step_kind=lcm"],  # the LCM step has no spacing
    ["model.lora.enabled=true", "model.lora.init=true", "model.lora.alpha=8"],
    ["model.lora.enabled=false", "model.lora.alpha=0"],  # no adapter: its settings are unused
    ["seed=4294967295"],
    ["trainer.accumulate_grad_batches=1"],
    ["algo.max_grad_norm=null"],
    ["optim.lr=1", "algo.clip_range=1", "model.resolution=null", "model.lora.alpha=null"],  # ints are numbers too
    ["callbacks.eval.steps=4", "callbacks.requeue.signal=sigusr2"],  # one step count; any case, with SIG or not
    ["callbacks.eval=null", "callbacks.sample_grid=null", "callbacks.requeue=null"],
])
def test_sound_neighbours_pass(overrides: list[str], tmp_path) -> None:
    assert problems(overrides, tmp_path) == ""


@pytest.mark.parametrize("override,built", [
    ("callbacks.eval.steps=[0,1]", None), ("callbacks.sample_grid.max_prompts=0", None),
    ("callbacks.requeue.signal=FOO", None), ("callbacks.eval.steps=4", ("eval", "steps", (4,))),
    ("callbacks.requeue.signal=sigusr2", ("requeue", "signum", signal.SIGUSR2)),
    ("callbacks.pace.every_seconds=-1", None), ("callbacks.pace.every_seconds=0", ("pace", "every_seconds", 0.0)),
])
def test_callbacks_refuse_as_they_are_built_what_the_config_check_refuses(override, built, tmp_path) -> None:
    """The same check runs in each callback's __init__ (a callback built without the config check)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    name = override.split(".")[1]
    node = compose([override], tmp_path, tmp_path).callbacks[name]
    if built is None:
        with pytest.raises(InstantiationException) as refused:  # Hydra's wrapper of the callback's error
            instantiate(node)
        assert isinstance(refused.value.__cause__, ValueError)
        assert str(refused.value.__cause__) in problems([override], tmp_path)
    else:
        assert getattr(instantiate(node), built[1]) == built[2]


@pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("open_clip", "ImageReward")),
                    reason="an optional reward package is installed here")
@pytest.mark.parametrize("overrides,expected", [
    (["reward=hpsv2"], "reward.name: reward 'hpsv2' needs the optional package open_clip: pip install -e \".[hpsv2]\""),
    (["callbacks.eval.rewards=[imagereward]"], "callbacks.eval.rewards: reward 'imagereward' needs the optional "
                                              "package ImageReward"),
    (["reward=multi", "~reward.components.aesthetic", "+reward.components.hpsv2.weight=1"],
     "reward.components.hpsv2: reward 'hpsv2' needs the optional package open_clip"),
])
def test_a_missing_optional_reward_package_is_named_before_loading(overrides, expected, tmp_path) -> None:
    """Not after the policy model was downloaded and built, as the reward's own import would."""
    assert expected in problems(overrides, tmp_path)


def test_a_float_count_names_the_integer_to_write_and_not_the_keys_that_follow_it(tmp_path) -> None:
    message = problems(["data.prompts_per_batch=8.0"], tmp_path)
    assert "data.prompts_per_batch=8.0: need an integer (write 8)" in message
    assert "sample_batch_size" not in message  # it follows data.prompts_per_batch by default


def test_a_bad_batch_size_is_reported_at_the_key_that_was_set(tmp_path) -> None:
    """algo.sample_batch_size follows data.prompts_per_batch by default: a bad prompts_per_batch names that key
    alone, not the derived one the user never set; a sample_batch_size set by hand is still checked."""
    lines = problems(["data.prompts_per_batch=0"], tmp_path).splitlines()[1:]
    assert lines == ["  - data.prompts_per_batch=0: need >= 1"]
    both = problems(["algo.sample_batch_size=0", "data.batches_per_epoch=0"], tmp_path)
    assert "algo.sample_batch_size=0: need >= 1" in both and "data.batches_per_epoch=0: need >= 1" in both


def test_fp16_autocast_is_refused_where_the_run_lands_on_the_cpu(tmp_path) -> None:
    """Lightning would quietly train in bf16 instead: refused for accelerator=cpu, and for auto without CUDA."""
    assert "trainer.precision=16-mixed needs a GPU" in problems(
        ["trainer.precision=16-mixed", "trainer.accelerator=cpu"], tmp_path)
    auto = problems(["trainer.precision=16-mixed"], tmp_path)
    assert ("trainer.accelerator=auto runs on the CPU here" in auto) == (not torch.cuda.is_available())


def test_training_schedule_must_stop_above_zero() -> None:
    leading = make_scheduler(sd_turbo_like(), "leading", 0)
    with pytest.raises(ValueError, match=r"\[750, 500, 250, 0\] .*ends at t = 0.*model.steps_offset=1"):
        check_training_schedule(timestep_schedule(leading, 4), "ddim", "leading", None)
    with pytest.raises(ValueError, match=r"\[980, 960, 940, '...', 20, 0\]"):  # long schedules are shortened
        check_training_schedule(timestep_schedule(leading, 50), "ddim", "leading", None)
    offset = make_scheduler(sd_turbo_like(), "leading", 1)
    check_training_schedule(timestep_schedule(offset, 50), "ddim", "leading", 1)  # 981..1
    trailing = make_scheduler(sd_turbo_like(), "trailing")
    check_training_schedule(timestep_schedule(trailing, 4), "ddim", "trailing", None)
    check_training_schedule(torch.tensor([999, 0]), "lcm", "trailing", None)  # an LCM's last step does not log-prob


def test_scheduler_offset_zero_stops_the_run_before_sampling(tmp_path, cache_dir) -> None:
    """The tiny SD scheduler has steps_offset 0, so leading spacing ends at t = 0 there; the tiny SDXL one has 1."""
    cfg = compose([*FAST, "model.spacing=leading", "trainer.max_epochs=1"], tmp_path / "sd", cache_dir)
    validate_config(cfg)  # the offset is the scheduler's: only the loaded model can tell
    with pytest.raises(ValueError, match=r"model.spacing=leading, model.steps_offset=None.*ends at t = 0"):
        train(cfg)
    assert not (tmp_path / "sd" / "checkpoints").exists() and not (tmp_path / "sd" / "csv").exists()
    cfg = compose([*FAST, "model=tiny_sdxl", "model.spacing=leading", "trainer.max_epochs=1"], tmp_path / "sdxl",
                  cache_dir)
    train(cfg)
    assert (tmp_path / "sdxl" / "checkpoints" / "last.ckpt").exists()


def test_sample_grid_refuses_what_it_cannot_draw() -> None:
    from sdpo.callbacks import SampleGrid

    for kwargs in ({"every_n_epochs": 0}, {"max_prompts": 0}):
        with pytest.raises(ValueError, match=r"callbacks.sample_grid.every_n_epochs=.* need >= 1 each"):
            SampleGrid("unused", **kwargs)


def test_unknown_lora_target_lists_the_choices(cache_dir) -> None:
    from diffusers import UNet2DConditionModel

    from sdpo.policy.loading import TinySpec, ensure_tiny_pipeline

    folder = ensure_tiny_pipeline(cache_dir, TinySpec()) / "unet"
    with pytest.raises(ValueError, match=r"model.lora.targets=\['to_qq'\] matches no module .*'to_out.0', 'to_q'"):
        make_trainable(UNet2DConditionModel.from_pretrained(folder), True, targets=["to_qq"])
    assert len(make_trainable(UNet2DConditionModel.from_pretrained(folder), True, targets=["to_q"])) > 0


def test_prompts_the_reward_cannot_score_stop_the_run_before_sampling(tmp_path, cache_dir, monkeypatch) -> None:
    """color_match needs a colour in every prompt. The config checks find it (RewardModel.prompt_problem): the
    training prompts, the held-out ones, a multi reward's part, the evaluation CLI's prompts. A reward that
    overrides only check_prompts is still checked as fitting starts (the CLI's once its rewards are built), and
    nothing samples an image first."""
    from sdpo.eval_config import validate_eval_config
    from sdpo.evaluate_run import evaluate
    from sdpo.rewards import RewardModel
    from sdpo.rewards.pixel_stats import ColorMatch
    from tests.conftest import compose_eval

    no_colour = r"of data.source name no known colour \('cat', 'dog'"
    held_out = r"of callbacks.eval.prompts name no known colour \('cow'"
    cli = r"3 prompt\(s\) of prompts name no known colour"
    training = compose([*FAST, "reward=color_match", "callbacks.eval=null"], tmp_path / "a", cache_dir)
    evaluating = compose([*FAST, "reward=color_match", "data.source=[red cat,blue dog]"], tmp_path / "b", cache_dir)
    evaluation = compose_eval(["rewards=[color_match]"], tmp_path / "c", cache_dir)
    for cfg, says in ((training, no_colour), (evaluating, held_out)):
        with pytest.raises(ConfigError, match=says):
            validate_config(cfg)
    parts = compose(["reward=multi", "~reward.components.pickscore", "~reward.components.aesthetic",
                     "+reward.components.color_match.weight=1", "callbacks.eval=null"], tmp_path / "d", cache_dir)
    with pytest.raises(ConfigError, match=no_colour):
        validate_config(parts)
    with pytest.raises(ConfigError, match=cli):
        validate_eval_config(evaluation)

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the prompts were checked")

    monkeypatch.setattr(ColorMatch, "prompt_problem", RewardModel.prompt_problem)  # as a reward without it
    monkeypatch.setattr("sdpo.module.SDPOModule.sample_and_score", no_sampling)
    monkeypatch.setattr("sdpo.evaluation.sample_native", no_sampling)
    validate_config(training)
    with pytest.raises(UnscorablePrompts, match=no_colour):
        train(training)
    with pytest.raises(UnscorablePrompts, match=held_out):
        train(evaluating)
    with pytest.raises(UnscorablePrompts, match=cli):
        evaluate(evaluation)


def test_every_registered_reward_has_its_config(tmp_path, downloads) -> None:
    """``reward=<name>`` works for each registered reward: its file names that reward and passes the check where its
    weights can be downloaded (offline, they must be in the cache first: tests/unit/test_reward_weights.py)."""
    downloads(True)
    from pathlib import Path

    from sdpo.rewards import available_rewards
    from tests.conftest import CONFIG_DIR

    files = sorted(p.stem for p in (Path(CONFIG_DIR) / "reward").glob("*.yaml"))
    assert files == available_rewards()
    from sdpo.rewards.registry import missing_packages

    coloured = ["data.source=[a red cat,a blue dog]", "callbacks.eval.prompts=[a green bird]"]  # its yaml's example
    for name in files:
        overrides = [f"reward={name}", *(coloured if name == "color_match" else [])]
        cfg = compose(overrides, tmp_path, tmp_path)
        assert cfg.reward.name == name
        # passes, or (hpsv2, imagereward without their extras) names only the packages to install
        expected = [f"reward.name: {problem}" for problem in missing_packages(name)]
        assert problems(overrides, tmp_path) == (
            "invalid configuration:\n  - " + "\n  - ".join(expected) if expected else "")


def test_every_shipped_config_uses_only_keys_something_reads(tmp_path) -> None:
    """The key check accepts every experiment and option the repo ships, and the keys the tests add with +."""
    from pathlib import Path

    from sdpo.app_config import CONFIG_DIR
    from sdpo.config_keys import unknown_keys

    experiments = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
    for overrides in ([f"+experiment={name}"] for name in experiments):
        assert unknown_keys(compose(overrides, tmp_path, tmp_path), CONFIG_DIR) == [], overrides
    for group in ("model", "reward", "trainer", "data", "logger", "callbacks"):
        for option in sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml")):
            assert unknown_keys(compose([f"{group}={option}"], tmp_path, tmp_path), CONFIG_DIR) == [], option
    added = compose(["+trainer.limit_train_batches=1", "reward=multi", "+reward.components.brightness.weight=1",
                     "+reward.components.aesthetic.clip_model=/models/clip"], tmp_path, tmp_path)
    assert unknown_keys(added, CONFIG_DIR) == []


def test_trainer_arguments_read_from_source_are_the_imported_trainers() -> None:
    """The command line checks trainer keys before importing Lightning, from Trainer's source: the same names as the
    class's own signature (this fails if a Lightning release moves or reshapes ``Trainer.__init__``)."""
    import lightning as L

    from sdpo.config_keys import _arguments, _trainer_source_arguments

    from_source = _trainer_source_arguments()
    assert from_source is not None and {"max_epochs", "devices", "precision", "accumulate_grad_batches"} <= from_source
    assert from_source == _arguments(L.Trainer)


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="this machine has a GPU")
def test_a_gpu_trainer_on_a_machine_without_one_names_the_cpu_override(tmp_path) -> None:
    """Lightning would say only "No supported gpu backend found!", from inside the trainer's instantiation."""
    for trainer in ("ddp", "gpu"):
        assert "trainer.accelerator=gpu (trainer=gpu and trainer=ddp ask for one), but this machine has no GPU: add " \
               "trainer.accelerator=cpu" in problems([f"trainer={trainer}"], tmp_path)
    assert problems(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], tmp_path) == ""
    # trainer=ddp's precision follows the accelerator (32-true on the CPU): the precision override is not needed
    assert "trainer.precision" not in problems(["trainer=ddp"], tmp_path)
    # an experiment's fp16 autocast: the one message names both overrides, not one run each
    assert "add trainer.accelerator=cpu and trainer.precision=bf16-mixed (16-mixed autocast needs a GPU)" in problems(
        ["trainer=gpu", "trainer.precision=16-mixed"], tmp_path)


def test_a_single_pair_per_iteration_is_warned_about(tmp_path, caplog) -> None:
    from sdpo.train_run import warn_single_pair

    one = ["data.prompts_per_batch=1", "algo.micro_batch_pairs=1"]
    with caplog.at_level("WARNING", logger="sdpo.train"):
        assert warn_single_pair(compose(one, tmp_path, tmp_path))
    assert "normalised over that pair alone" in caplog.text
    assert not warn_single_pair(compose([], tmp_path, tmp_path))
    assert not warn_single_pair(compose([*one, "trainer.devices=2"], tmp_path, tmp_path))  # 2 pairs gathered
    assert not warn_single_pair(compose([*one, "data.batches_per_epoch=2"], tmp_path, tmp_path))


def test_ckpt_path_last_in_a_run_continued_in_its_folder_names_that_folder_s_checkpoint(tmp_path) -> None:
    """hydra.run.dir=<run> ckpt_path=last: the file is there, but the resume checks need its path."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert f"give the checkpoint's path (ckpt_path={tmp_path}/checkpoints/last.ckpt)" in problems(["ckpt_path=last"],
                                                                                                  tmp_path)
