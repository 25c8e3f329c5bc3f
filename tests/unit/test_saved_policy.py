"""An export applied to another base model than it was trained on is named (``sdpo.saved_policy``)."""

from __future__ import annotations

import json
import logging

from sdpo.model_card import TRAINING_FILE
from sdpo.saved_policy import base_model_differences, warn_if_trained_on_another_base

TINY = {"source": "tiny", "revision": None, "tiny": {"seed": 0, "latent_size": 8}}


def test_only_settings_that_change_the_base_model_count():
    assert base_model_differences(TINY, {**TINY, "spacing": "leading", "lora": {"rank": 2}}) == []
    other_seed = {**TINY, "tiny": {"seed": 1, "latent_size": 8}}
    assert base_model_differences(TINY, other_seed) == ["model.tiny.seed: trained on 0, here 1"]
    hub = {"source": "stabilityai/sd-turbo", "revision": None}
    assert base_model_differences(hub, {**hub, "tiny": {"seed": 5}}) == []  # a hub model's tiny spec is unused
    assert base_model_differences(hub, {**hub, "revision": "abc"}) == ["model.revision: trained on None, here 'abc'"]


def test_the_warning_names_the_differences_and_where_the_settings_are(tmp_path, caplog):
    (tmp_path / TRAINING_FILE).write_text(json.dumps({"model": TINY}))
    with caplog.at_level(logging.WARNING, logger="sdpo.saved_policy"):
        warn_if_trained_on_another_base(tmp_path, TINY)
        assert caplog.text == ""
        warn_if_trained_on_another_base(tmp_path, {**TINY, "source": "stabilityai/sd-turbo"})
    assert "trained on another base model than the one it is applied to here (model.source: trained on 'tiny', " \
           "here 'stabilityai/sd-turbo')" in caplog.text and TRAINING_FILE in caplog.text
