"""A small CLIP byte-level BPE tokenizer built in code, so the offline default needs no downloads.

It follows CLIP's conventions (byte-to-unicode alphabet, ``</w>`` end-of-word suffix, start/end tokens) with a
tiny merge table learned from a fixed word list: any text still tokenizes (unknown words fall back to single
bytes), and the listed words become single tokens, which keeps the tiny text encoder's sequences short.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_alphabet() -> list[str]:
    """CLIP's reversible map of the 256 byte values onto printable unicode characters, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Left-to-right merges that turn each word (lower-cased, ASCII) into one ``word</w>`` token."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in words:
        symbols = list(word.lower())
        if not symbols:
            continue
        symbols[-1] += "</w>"
        current = symbols[0]
        for symbol in symbols[1:]:
            pair = (current, symbol)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            current += symbol
    return merges


def build_clip_tokenizer(words: Iterable[str], model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the byte alphabet plus the merges of ``words``."""
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = word_merges(words)
    tokens += ["".join(pair) for pair in merges]
    tokens += [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def save_tokenizer(tokenizer: CLIPTokenizer, directory: str | Path) -> None:
    """``save_pretrained`` plus the classic vocab.json/merges.txt pair, so older transformers load it too."""
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    vocab = tokenizer.get_vocab()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = getattr(tokenizer, "_merges", [])
    lines = ["#version: 0.2"] + [" ".join(pair) if isinstance(pair, tuple) else pair for pair in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n")
