"""Where the Hydra configs live, and the resolvers they use.

Light on purpose (the standard library and omegaconf): the command-line modules ``sdpo.train`` and
``sdpo.evaluate`` import it at start-up, and Hydra answers ``--help``, ``--cfg`` and shell completion (one process
per TAB) before any torch, Lightning or diffusers import.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def by_accelerator(accelerator: str, gpu_value: str, cpu_value: str) -> str:
    """``gpu_value`` unless the run is on CPU: lets conf/trainer/ddp.yaml default to 16-mixed on GPUs and still
    run with ``trainer.accelerator=cpu`` (gloo), where fp16 autocast does not exist."""
    from sdpo.config_checks import runs_on_cpu  # torch: only when a config is resolved for a run

    return cpu_value if runs_on_cpu(accelerator) else gpu_value


OmegaConf.register_new_resolver("sdpo.by_accelerator", by_accelerator, replace=True)
