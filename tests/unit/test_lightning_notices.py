"""What a run says about precision, and the Lightning notices it drops (``sdpo.train_run._drop_adverts``)."""

from __future__ import annotations

import logging

import pytest

from sdpo.run_header import precision_text
from sdpo.train_run import _drop_adverts


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, __file__, 1, message, None, None)


@pytest.mark.parametrize(("message", "kept"), [
    ("You are using a CUDA device ('NVIDIA H100 80GB HBM3') that has Tensor Cores. To properly utilize them, you "
     "should set `torch.set_float32_matmul_precision('medium' | 'high')` which will trade-off precision", False),
    ("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]", False),
    ("GPU available: True (cuda), used: True", True),
    ("`Trainer.fit` stopped: `max_epochs=2` reached.", True),
])
def test_only_notices_that_advise_against_the_run_are_dropped(message, kept):
    assert _drop_adverts(record(message)) is kept


def test_a_full_fp32_gpu_run_says_tf32_is_off_and_why():
    assert precision_text("32-true", "cuda") == "precision 32-true (TF32 off: it moves log-probs by about 1e-4, the " \
                                               "clip range)"
    assert precision_text("32-true", "cpu") == "precision 32-true"  # no TF32 on a CPU
    assert precision_text("bf16-mixed", "cuda") == "precision bf16-mixed"


def test_the_many_workers_advice_is_silenced_and_other_warnings_are_not():
    """GPU nodes have many cores, and Lightning then advises dataloader workers for a loader of prompt strings."""
    import warnings

    from sdpo.train_run import quiet_libraries

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("The 'train_dataloader' does not have many workers which may be a bottleneck.", UserWarning,
                      stacklevel=1)
        warnings.warn("something the user should see", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something the user should see"]
