"""The header printed at fit start states what the run then really does."""

from __future__ import annotations

import re

import pytest

from sdpo.run_header import count
from sdpo.train_run import train
from tests.conftest import FAST, compose, read_metrics


@pytest.mark.parametrize("overrides,sizes", [
    (["algo.micro_batch_pairs=2", "algo.gradient_accumulation_steps=2"],  # 4 pairs: one group per column
     "each on 4 pairs (micro-batch 2 x 2 accumulation)"),
    (["data.prompts_per_batch=5", "algo.micro_batch_pairs=2", "algo.gradient_accumulation_steps=1",
      "algo.num_inner_epochs=2", "algo.num_steps=3"],  # uneven: each column ends on a 1-pair group
     "each on 2 pairs (micro-batch 2 x 1 accumulation), the last of each step column on 1"),
    (["model.lora.enabled=true", "algo.dense.anchor=all", "algo.micro_batch_pairs=8"],  # more than the 4 pairs
     "each on the 4 pairs of a step column (all of them: fewer than micro-batch 8 x 2 accumulation = 16)"),
])
def test_header_matches_the_run(overrides, sizes, tmp_path, cache_dir, capsys):
    trainer = train(compose([*FAST, "trainer.max_epochs=1", *overrides], tmp_path, cache_dir))
    out = capsys.readouterr().out
    header = out[out.index("SDPO run:"):]
    steps = int(re.search(r"(\d+) optimizer steps per iteration", header).group(1))
    assert steps == read_metrics(tmp_path)[0]["train/optimizer_steps"]  # counted by the module as it stepped
    assert f"optimizer steps per iteration, {sizes}, lr" in header
    module = trainer.lightning_module
    trainable = sum(p.numel() for p in module.unet.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.unet.parameters())
    if module.model_cfg["lora"]["enabled"]:
        assert f"on to_q, to_k, to_v, to_out.0: {count(trainable)} of {count(total)} params train" in header
        assert "exact at all 4 steps" in header
    else:
        assert f"all {count(trainable)} params train (full fine-tune)" in header
        assert f"argmin anchor step(s) of {module.algo_cfg['num_steps']}" in header
    first, last = module.timesteps[0].item(), module.timesteps[-1].item()
    assert f"x T = {module.algo_cfg['num_steps']} steps (timesteps {first}..{last})" in header
    assert "litlogger" not in out


@pytest.mark.parametrize(("limits", "iterations"), [
    (["trainer.max_epochs=2"], 2),
    (["trainer.max_epochs=5", "trainer.max_steps=6"], 2),  # 4 steps per iteration: step 6 falls in the second
    (["trainer.max_epochs=5", "trainer.max_steps=4"], 1),
    (["trainer.max_epochs=1", "trainer.max_time=00:01:00:00"], 1),  # a wall-clock limit is named, not predicted
    (["trainer.fast_dev_run=true"], 1),  # Lightning's one-iteration check (no checkpoints, no logs)
])
def test_header_states_the_runs_length(limits, iterations, tmp_path, cache_dir, capsys):
    """The length line names the limit that ends the run, and the run then makes exactly what it said."""
    train(compose([*FAST, "algo.micro_batch_pairs=1", "algo.gradient_accumulation_steps=4", *limits], tmp_path,
                  cache_dir))  # 4 pairs (8 trajectories), T = 4: one group per column, 4 optimizer steps per iteration
    header = capsys.readouterr().out
    length = re.search(r"length +(\d+) iterations? \((trainer\.\w+)\) = (\d+) trajectories, "
                       r"(\d+) optimizer steps(.*)", header)
    assert length is not None, header
    if "fast_dev_run" in limits[-1]:
        assert length.group(1) == "1" and length.group(2) == "trainer.fast_dev_run" and "1 iteration (" in header
        assert not (tmp_path / "csv").exists() and not (tmp_path / "checkpoints").exists()
        return
    rows = read_metrics(tmp_path)
    assert int(length.group(1)) == iterations == len(rows)
    assert int(length.group(3)) == rows[-1]["train/samples"] == iterations * 8
    assert int(length.group(4)) == iterations * 4 == sum(r["train/optimizer_steps"] for r in rows)
    assert length.group(2) == ("trainer.max_steps" if "max_steps" in limits[-1] else "trainer.max_epochs")
    assert ("falls inside an iteration" in length.group(5)) == (limits[-1] == "trainer.max_steps=6")
    assert ("or trainer.max_time, if sooner" in length.group(5)) == ("max_time" in limits[-1])


def test_count_reads_like_a_person_would() -> None:
    assert [count(n) for n in (12, 20_000, 829_952, 866_700_000, 2_600_000_000)] == \
        ["12", "20.0 K", "830.0 K", "866.7 M", "2.6 B"]


def test_a_weighted_sum_reward_shows_its_parts(tmp_path, cache_dir, capsys):
    train(compose([*FAST, "trainer.max_epochs=1", "reward=multi", "~reward.components.pickscore",
                   "~reward.components.aesthetic", "+reward.components.brightness.weight=1.0",
                   "+reward.components.colorfulness.weight=0.5"], tmp_path, cache_dir))
    assert "reward multi = 1 x brightness + 0.5 x colorfulness (MultiReward, no parameters)" in capsys.readouterr().out


def test_prompts_past_the_text_encoders_context_are_reported_once(tmp_path, cache_dir, caplog):
    import logging

    long = " ".join(["red cat dog"] * 30)  # 90 words of the tiny vocabulary: past CLIP's 77 tokens
    with caplog.at_level(logging.WARNING, logger="sdpo.module"):
        train(compose([*FAST, "trainer.max_epochs=1", f"data.source=[cat,dog,'{long}']"], tmp_path, cache_dir))
    said = [r.getMessage() for r in caplog.records if "exceed the text encoder" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("1 of the 3 distinct prompts of data.source exceed the text "
                                                 "encoder's 77 tokens"), said
