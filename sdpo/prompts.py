"""Prompt sources: the built-in sets, text files and lists that ``data.source`` and the held-out prompts name.

Kept apart from ``sdpo.data`` (which imports Lightning) so that the config check can read a prompt source in a
command that has not imported the training stack yet, and refuse a bad one at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SIMPLE_ANIMALS: tuple[str, ...] = (
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
    "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark", "whale",
    "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig",
    "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
)  # the reference code's 45 training prompts, used verbatim
UNSEEN_EXAMPLES: tuple[str, ...] = (
    "A green colored rabbit", "Four wolves in the park", "A cat and a dog", "A dog on the moon",
)

STATE_KEY = "PromptDataModule"  # Lightning saves a datamodule's state_dict under its class's __qualname__


def load_prompts(source: str | Sequence[str]) -> list[str]:
    """A prompt list from a built-in name ("simple_animals", "unseen_examples"), a text file, or a list.

    A text file holds one prompt per line; blank lines and lines whose first non-blank character is ``#`` (comments)
    are skipped, surrounding spaces removed. A prompt listed twice is kept twice: it is drawn twice as often."""
    if not isinstance(source, str):
        prompts = [str(p) for p in source]
    elif source == "simple_animals":
        prompts = list(SIMPLE_ANIMALS)
    elif source == "unseen_examples":
        prompts = list(UNSEEN_EXAMPLES)
    elif Path(source).expanduser().is_file():
        lines = Path(source).expanduser().read_text().splitlines()
        prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    else:
        raise ValueError(
            f"prompt source {source!r} is neither a built-in set ('simple_animals', 'unseen_examples') "
            f"nor an existing file (one prompt per line)"
        )
    if not prompts:
        raise ValueError(f"prompt source {source!r} holds no prompts")
    return prompts


def stored_prompts(checkpoint: Mapping[str, Any]) -> list[str]:
    """The training prompts a checkpoint holds (``PromptDataModule.state_dict`` saved them); [] for one written
    without."""
    return list((checkpoint.get(STATE_KEY) or {}).get("training_prompts", []))
