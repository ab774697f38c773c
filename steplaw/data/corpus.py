"""The embedded corpus: the King James Bible, shipped xz-compressed as package data.

Split into training and validation text by blocks: the text is cut into blocks of
`BLOCK_BYTES`, and every 20th block (counted from the 10th, so the first chapters stay in
training) goes to validation, so validation (5%, about 200 KB) covers the whole book
rather than its last pages. `steplaw data prepare` splits user text the same way
(`split_blocks`; steplaw.data.tokens imports it from here, never the other way).
"""
from __future__ import annotations

import functools
import lzma
from importlib import resources

CORPUS_FILE = "kjv.txt.xz"
BLOCK_BYTES = 8192
VAL_FRACTION = 0.05


@functools.lru_cache(maxsize=1)
def corpus_bytes() -> bytes:
    """The whole corpus as UTF-8 (here ASCII) bytes."""
    data = resources.files("steplaw.data").joinpath("corpus", CORPUS_FILE).read_bytes()
    return lzma.decompress(data)


def corpus_text() -> str:
    return corpus_bytes().decode("utf-8")


@functools.lru_cache(maxsize=1)
def corpus_split() -> tuple[bytes, bytes]:
    """(train, validation) bytes of the corpus."""
    train, val = split_blocks(corpus_bytes(), VAL_FRACTION, BLOCK_BYTES)
    return b"".join(train), b"".join(val)


def split_blocks(text, val_fraction: float, block: int):
    """(train, val) pieces of a str or bytes: every round(1/val_fraction)-th block of
    `block` characters (from the 10th on) goes to validation. Short texts get smaller
    blocks, so that at least two blocks go to validation."""
    val_every = max(2, round(1 / val_fraction))
    block = max(1, min(block, len(text) // (2 * val_every + 9)))
    train, val = [], []
    for index, start in enumerate(range(0, len(text), block)):
        (val if index % val_every == 9 % val_every else train).append(text[start:start + block])
    return train, val
