"""Prompt streaming: per-rank, per-epoch, reproducible draws."""

from __future__ import annotations

import pytest

from sdpo.data import EpochSampler, IterationPrompts, PromptDataModule
from sdpo.prompts import SIMPLE_ANIMALS, load_prompts


def test_builtin_and_file_sources(tmp_path):
    assert load_prompts("simple_animals") == list(SIMPLE_ANIMALS) and len(SIMPLE_ANIMALS) == 45
    f = tmp_path / "p.txt"
    f.write_text("# comment\na cat\n\n a dog \n   # an indented comment\r\na cat\n")
    assert load_prompts(str(f)) == ["a cat", "a dog", "a cat"]  # comments after stripping; repeats kept
    assert load_prompts(["x", "y"]) == ["x", "y"]
    with pytest.raises(ValueError, match="neither a built-in"):
        load_prompts("nope.txt")
    empty = tmp_path / "e.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(str(empty))


def test_draws_depend_on_epoch_and_rank_and_reproduce():
    prompts = list(SIMPLE_ANIMALS)
    r0, r1 = IterationPrompts(prompts, 16, 0, 0), IterationPrompts(prompts, 16, 0, 1)
    assert r0[3] == IterationPrompts(prompts, 16, 0, 0)[3]  # a resumed run draws the same prompts
    assert r0[3] != r0[4] and r0[3] != r1[3] and len(r0[3]) == 16


def test_sampler_follows_set_epoch():
    s = EpochSampler()
    s.set_epoch(7)
    assert list(s) == [7] and len(s) == 1


def test_bad_sizes_fail_early():
    with pytest.raises(ValueError, match="prompts_per_batch"):
        PromptDataModule(["a"], 0, 1)


def test_checkpoint_state_holds_the_resolved_prompts_and_warns_when_resumed_with_others(tmp_path, caplog):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red cube\n# a comment\na blue ball\n")
    state = PromptDataModule(str(prompt_file), prompts_per_batch=2, batches_per_epoch=1).state_dict()
    assert state == {"source": str(prompt_file), "training_prompts": ["a red cube", "a blue ball"]}
    with caplog.at_level("WARNING", logger="sdpo.data"):
        PromptDataModule(["a red cube", "a blue ball"], 2, 1).load_state_dict(state)
        assert not caplog.records
        PromptDataModule("simple_animals", 2, 1).load_state_dict(state)
    assert "other training prompts" in caplog.text
