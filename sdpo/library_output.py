"""What the libraries print during a run: only what says something about it, each line once.

diffusers, transformers, Lightning and huggingface_hub print notices, advice and deprecation warnings that concern
their own internals or settings a run makes on purpose; on the command line some were printed twice.
"""

from __future__ import annotations

import logging
import warnings


def _drop_adverts(record: logging.LogRecord) -> bool:
    """Drop Lightning notices that say nothing about the run or advise against it: "Tip: try installing litlogger",
    printed at every start, and "set torch.set_float32_matmul_precision('medium' | 'high')" on Ampere and later
    GPUs. That TF32 advice is what a 32-true run turns off on purpose (TF32 moves log-probs by about the clip
    range; the run header says so), and a mixed-precision run's UNet matmuls are already bf16/fp16."""
    message = record.getMessage()
    return "litlogger" not in message and "set_float32_matmul_precision" not in message


def quiet_libraries() -> None:
    """Silence warnings from diffusers/transformers that say nothing about the user's run."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # Frozen parts are in eval mode on purpose; the pytree notice is Lightning-internal.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*litlogger")
    # a resume writes into a new run folder by design; the best-model bookkeeping it says it drops is unused here
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
    # a run continued in its own folder (hydra.run.dir=<run> ckpt_path=...) finds its checkpoints there by design
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_drop_adverts)
    logging.getLogger("huggingface_hub.hf_api").addFilter(_drop_offline_notice)
    # diffusers passes an argument huggingface_hub deprecated: nothing the user can act on
    warnings.filterwarnings("ignore", message=r"The `local_dir_use_symlinks` argument is deprecated")
    print_library_messages_once()
    # DDP: the module logs values it has already gathered over ranks, so sync_dist would only repeat the reduction.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(.*sync_dist=True")
    # Printed on machines with many cores (every GPU node): the loader yields a few prompt strings per iteration,
    # which worker processes would only delay.
    warnings.filterwarnings("ignore", message=r"The '\w+_dataloader' does not have many workers")


def _drop_offline_notice(record: logging.LogRecord) -> bool:
    """Drop huggingface_hub's "Could not reach the Hub (... offline mode is enabled ...). Using cached commit hash",
    printed for every model loaded from the cache while downloads are off: what the user asked for with
    HF_HUB_OFFLINE=1. Kept when the network failed on its own."""
    from huggingface_hub import is_offline_mode

    return not (is_offline_mode() and record.getMessage().startswith("Could not reach the Hub"))


def print_library_messages_once() -> None:
    """Lightning's top package and huggingface_hub give their loggers a console handler of their own and still pass
    every record on to the root logger, whose console handler (Hydra's, on the command line) printed each message a
    second time. With a console handler at the root, theirs go: one line each, in the format of the run's other
    lines (and in the run's log file)."""
    if not [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]:
        return
    for name in ("lightning", "huggingface_hub"):
        library = logging.getLogger(name)
        if library.propagate:
            for handler in [h for h in library.handlers if type(h) is logging.StreamHandler]:
                library.removeHandler(handler)
