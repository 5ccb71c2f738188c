"""Training data that needs no download: a learnable synthetic token stream, or a local text file read as bytes.

Both yield whole global batches, identical for a given seed and step whatever the plan, so runs of different
layouts see the same tokens and their losses compare (each data-parallel rank then takes its own rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BYTE_VOCAB = 256  # the byte-level tokenizer's vocabulary: one token per byte value
SHIPPED_TEXT = Path(__file__).parent / "texts" / "founding.txt"


@dataclass(frozen=True)
class Batch:
    """A global batch: `tokens` and their next-token `targets`, both [global_batch, seq_len] int64."""

    tokens: np.ndarray
    targets: np.ndarray

    def rows(self, start: int, stop: int) -> Batch:
        return Batch(self.tokens[start:stop], self.targets[start:stop])


def _step_rng(seed: int, step: int) -> np.random.Generator:
    """One generator per (seed, step): batch k is the same whether or not batches before it were drawn,
    which is what lets a resumed run see the tokens an uninterrupted one would."""
    return np.random.default_rng([seed, step])


def synthetic_batch(vocab_size: int, seq_len: int, global_batch: int, seed: int, step: int) -> Batch:
    """Arithmetic sequences modulo the vocabulary, each with a random start and stride: a model can learn to
    continue them, so the loss falls within a few steps (used in ../shared/notes for the parity runs)."""
    rng = _step_rng(seed, step)
    start = rng.integers(0, vocab_size, size=(global_batch, 1))
    stride = rng.integers(1, min(vocab_size, 17), size=(global_batch, 1))
    sequence = (start + stride * np.arange(seq_len + 1)) % vocab_size
    return Batch(sequence[:, :-1].astype(np.int64), sequence[:, 1:].astype(np.int64))


def encode_bytes(text: bytes) -> np.ndarray:
    """The byte-level tokenizer: token = byte value (no merges, no vocabulary file)."""
    return np.frombuffer(text, dtype=np.uint8).astype(np.int64)


def decode_bytes(tokens: np.ndarray) -> str:
    return bytes(np.asarray(tokens, dtype=np.uint8)).decode("utf-8", errors="replace")


def read_corpus(path: Path, seq_len: int) -> np.ndarray:
    """A text file as byte tokens, refusing files too short to hold one training window."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    tokens = encode_bytes(path.read_bytes())
    if len(tokens) < seq_len + 1:
        raise ValueError(f"data file {path} has {len(tokens)} bytes; one window of seq_len + 1 = {seq_len + 1} needed")
    return tokens


def text_batch(corpus: np.ndarray, seq_len: int, global_batch: int, seed: int, step: int) -> Batch:
    """Random windows of seq_len + 1 bytes; the window's tail is the targets."""
    starts = _step_rng(seed, step).integers(0, len(corpus) - seq_len, size=global_batch)
    windows = corpus[starts[:, None] + np.arange(seq_len + 1)]
    return Batch(windows[:, :-1], windows[:, 1:])


def batches(
    *, vocab_size: int, seq_len: int, global_batch: int, seed: int, data: Path | None = None, first_step: int = 0
) -> Iterator[Batch]:
    """Global batches from `first_step` on: synthetic without `data`, else windows of the byte-tokenized file."""
    if data is not None and vocab_size < BYTE_VOCAB:
        raise ValueError(f"a text file needs vocab_size >= {BYTE_VOCAB} (byte tokens); the model has {vocab_size}")
    corpus = read_corpus(data, seq_len) if data is not None else None
    step = first_step
    while True:
        if corpus is None:
            yield synthetic_batch(vocab_size, seq_len, global_batch, seed, step)
        else:
            yield text_batch(corpus, seq_len, global_batch, seed, step)
        step += 1
