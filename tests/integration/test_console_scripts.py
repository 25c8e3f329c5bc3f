"""The console scripts (``sdpo-train``, ``sdpo-evaluate``, ``sdpo-plot``, ``sdpo-export``): the same commands as
``python -m sdpo.<name>``, and named ones, so that Hydra's bash completion can bind to them. ``sdpo-train``'s
re-launch of DDP ranks is tested in tests/integration/test_distributed.py (the compiled 2-process run starts through
it) and ``sdpo-plot``'s exit status in tests/integration/test_plot_notebook.py."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import console_script

COMPLETE = """eval "$({script} -sc install=bash)"
COMP_LINE="$1"; COMP_POINT=${{#COMP_LINE}}; COMP_CWORD=$(( $(wc -w <<< "$COMP_LINE") - 1 ))
hydra_bash_completion
printf '%s\\n' "${{COMPREPLY[@]}}"
"""


def complete(script: str, line: str) -> list[str]:
    """What bash offers on TAB after ``line``, through the function Hydra's ``-sc install=bash`` prints."""
    env = {**os.environ, "PATH": f"{console_script(script).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", COMPLETE.format(script=script), "complete", line], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()


@pytest.mark.parametrize("script,line,offers", [
    ("sdpo-train", "sdpo-train +experiment=sd_turbo_", {"+experiment=sd_turbo_aesthetic", "+experiment=sd_turbo_hpsv2",
                                                        "+experiment=sd_turbo_imagereward",
                                                        "+experiment=sd_turbo_pickscore"}),
    ("sdpo-train", "sdpo-train trainer=ddp algo.num_st", {"algo.num_steps="}),
    ("sdpo-evaluate", "sdpo-evaluate checkpoint=x images_per", {"images_per_prompt="}),
])
def test_tab_completes_config_groups_and_keys(script, line, offers):
    """Hydra's completion binds to the script's name (``python -m`` gives it nothing to bind to) and offers the
    options of that command's own config."""
    assert set(complete(script, line)) == offers


def test_argparse_commands_name_themselves_as_started():
    for script, first in (("sdpo-plot", "usage: sdpo-plot [-h]"), ("sdpo-export", "usage: sdpo-export [-h]")):
        result = subprocess.run([console_script(script), "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stdout.startswith(first), result.stdout[:200] + result.stderr[-2000:]
