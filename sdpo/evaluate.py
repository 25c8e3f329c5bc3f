"""Entry point: ``python -m sdpo.evaluate [checkpoint=PATH | lora=DIR] [steps=[1,2,4,8]] [rewards=[...]] ...``.

The evaluation itself is ``sdpo.evaluate_run``; config: ``conf/evaluate.yaml``. Start-up imports only Hydra and
omegaconf, so ``--help`` and shell completion answer at once (see ``sdpo.train``).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sdpo.app_config import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from sdpo.eval_config import validate_eval_config
    from sdpo.run_folder import REFUSALS, refuse

    try:
        validate_eval_config(cfg)  # the config alone, before diffusers and the models load: refused in seconds
        from sdpo.evaluate_run import evaluate

        evaluate(cfg)
    except REFUSALS as error:
        raise refuse(error) from None


if __name__ == "__main__":
    main()
