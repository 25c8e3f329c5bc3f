"""Commands the framework prints for a user to copy (continue a run, export it, evaluate it): each value must reach
Hydra as one string. A path with ``=``, ``,``, spaces or brackets (a sweep point's folder, a user's own folder)
breaks Hydra's override grammar unquoted; quoted for Hydra and then for the shell, it arrives intact."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

_PLAIN = re.compile(r"[\w./~+\-@%]+")  # safe unquoted for the shell and for Hydra's override grammar


def cli_arg(key: str, value: object) -> str:
    """``key=value`` as a shell word that Hydra parses back to ``value`` (a string)."""
    text = str(value)
    if _PLAIN.fullmatch(text):
        return f"{key}={text}"
    word = f"{key}='" + text.replace("'", "\\'") + "'"  # Hydra's quoted string: only the quote is escaped
    return f'"{word}"' if not re.search(r'["$`\\!]', word) else shlex.quote(word)


def program_name(module: str) -> str:
    """How the user started ``module``'s command, for its usage line: ``sdpo-plot`` through the console script
    (pyproject's ``[project.scripts]``), else ``python -m sdpo.plot``."""
    script = Path(sys.argv[0]).name
    return script if script == "sdpo-" + module.rpartition(".")[2] else f"python -m {module}"
