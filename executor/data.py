"""Training data that needs no download: a learnable synthetic token stream, or a local text file read as bytes.

Both yield whole global batches, identical for a given seed and step whatever the plan, so runs of different
layouts see the same tokens and their losses compare (each data-parallel rank then takes its own rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from planner.errors import Violation

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


def text_data_violations(path: Path, vocab_size: int, seq_len: int) -> list[Violation]:
    """Why a text file cannot feed this model (empty list: it can): it must exist, hold one training window
    of seq_len + 1 bytes, and every byte value must be a token of the model's vocabulary."""
    path = Path(path)
    if not path.is_file():
        return [Violation("data", "data_missing", f"data file {path} does not exist or is not a file")]
    problems = []
    if vocab_size < BYTE_VOCAB:
        problems.append(
            Violation(
                "model.vocab_size",
                "vocab_too_small_for_bytes",
                f"a text file is read as bytes ({BYTE_VOCAB} token values); the model's vocab_size is {vocab_size}",
            )
        )
    size = path.stat().st_size
    if size < seq_len + 1:
        problems.append(
            Violation(
                "data", "data_too_short", f"data file {path} has {size} bytes; seq_len + 1 = {seq_len + 1} needed"
            )
        )
    return problems


def read_corpus(path: Path, vocab_size: int, seq_len: int) -> np.ndarray:
    """A text file as byte tokens; ValueError naming every reason it cannot feed the model."""
    problems = text_data_violations(path, vocab_size, seq_len)
    if problems:
        raise ValueError("; ".join(str(problem) for problem in problems))
    return encode_bytes(Path(path).read_bytes())


def text_batch(corpus: np.ndarray, seq_len: int, global_batch: int, seed: int, step: int) -> Batch:
    """Random windows of seq_len + 1 bytes; the window's tail is the targets."""
    starts = _step_rng(seed, step).integers(0, len(corpus) - seq_len, size=global_batch)
    windows = corpus[starts[:, None] + np.arange(seq_len + 1)]
    return Batch(windows[:, :-1], windows[:, 1:])


def batches(
    *, vocab_size: int, seq_len: int, global_batch: int, seed: int, data: Path | None = None, first_step: int = 0
) -> Iterator[Batch]:
    """Global batches from `first_step` on: synthetic without `data`, else windows of the byte-tokenized file."""
    corpus = read_corpus(data, vocab_size, seq_len) if data is not None else None
    step = first_step
    while True:
        if corpus is None:
            yield synthetic_batch(vocab_size, seq_len, global_batch, seed, step)
        else:
            yield text_batch(corpus, seq_len, global_batch, seed, step)
        step += 1
