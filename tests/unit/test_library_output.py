"""What a run says about precision, and what it lets the libraries print (``sdpo.library_output``)."""

from __future__ import annotations

import io
import logging

import pytest

from sdpo.library_output import _drop_adverts, quiet_libraries
from sdpo.run_header import precision_text


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

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("The 'train_dataloader' does not have many workers which may be a bottleneck.", UserWarning,
                      stacklevel=1)
        warnings.warn("something the user should see", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something the user should see"]


def test_library_messages_print_once_and_the_offline_notice_not_at_all(downloads):
    """Under a root console handler (Hydra's on the command line), Lightning's and huggingface_hub's own handlers
    printed every message a second time; huggingface_hub's "Could not reach the Hub" notice came once per model
    loaded from the cache with HF_HUB_OFFLINE=1, which is what the user asked for."""
    import huggingface_hub  # noqa: F401  (its logger gets its console handler on import)
    import lightning  # noqa: F401

    printed = io.StringIO()
    console = logging.StreamHandler(printed)
    root = logging.getLogger()
    root.addHandler(console)
    try:
        quiet_libraries()
        for name in ("lightning", "huggingface_hub"):
            assert not [h for h in logging.getLogger(name).handlers if type(h) is logging.StreamHandler], name
        hub = logging.getLogger("huggingface_hub.hf_api")
        downloads(False)
        hub.warning("Could not reach the Hub (offline mode is enabled). Using cached commit hash for 'org/model'.")
        hub.warning("a hub warning")
        downloads(True)  # the network failed on its own: said
        hub.warning("Could not reach the Hub (timed out). Using cached commit hash for 'org/model'.")
    finally:
        root.removeHandler(console)
    assert printed.getvalue().splitlines() == [
        "a hub warning", "Could not reach the Hub (timed out). Using cached commit hash for 'org/model'."]
