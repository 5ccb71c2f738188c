"""Training data: deterministic per (seed, step), plan-independent, learnable; the shipped text and bad files."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from executor.data import (
    SHIPPED_TEXT,
    batches,
    decode_bytes,
    encode_bytes,
    read_corpus,
    synthetic_batch,
    text_data_violations,
)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_synthetic_batches_are_deterministic_and_resume_where_they_left_off():
    first = take(batches(vocab_size=256, seq_len=16, global_batch=8, seed=3), 5)
    again = take(batches(vocab_size=256, seq_len=16, global_batch=8, seed=3), 5)
    resumed = take(batches(vocab_size=256, seq_len=16, global_batch=8, seed=3, first_step=3), 2)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.targets, b.targets)
    assert np.array_equal(resumed[0].tokens, first[3].tokens) and np.array_equal(resumed[1].tokens, first[4].tokens)
    other = take(batches(vocab_size=256, seq_len=16, global_batch=8, seed=4), 1)[0]
    assert not np.array_equal(other.tokens, first[0].tokens)


def test_synthetic_targets_are_the_next_tokens_of_arithmetic_sequences():
    batch = synthetic_batch(vocab_size=100, seq_len=12, global_batch=4, seed=0, step=0)
    assert batch.tokens.shape == batch.targets.shape == (4, 12)
    assert np.array_equal(batch.tokens[:, 1:], batch.targets[:, :-1])
    stride = (batch.tokens[:, 1] - batch.tokens[:, 0]) % 100
    assert np.array_equal((batch.tokens[:, 0:1] + stride[:, None] * np.arange(12)) % 100, batch.tokens)
    assert batch.tokens.min() >= 0 and batch.tokens.max() < 100


def test_data_parallel_ranks_split_the_same_global_batch():
    batch = synthetic_batch(vocab_size=256, seq_len=8, global_batch=8, seed=1, step=2)
    halves = [batch.rows(0, 4), batch.rows(4, 8)]
    assert np.array_equal(np.concatenate([h.tokens for h in halves]), batch.tokens)


def test_shipped_text_windows_are_byte_tokens_of_the_file():
    corpus = read_corpus(SHIPPED_TEXT, vocab_size=256, seq_len=64)
    batch = take(batches(vocab_size=256, seq_len=64, global_batch=4, seed=0, data=SHIPPED_TEXT), 1)[0]
    assert batch.tokens.shape == (4, 64)
    text = SHIPPED_TEXT.read_text()
    for row in batch.tokens:
        assert decode_bytes(row) in text
    assert np.array_equal(encode_bytes(b"Four score"), np.array([70, 111, 117, 114, 32, 115, 99, 111, 114, 101]))
    assert len(corpus) == len(SHIPPED_TEXT.read_bytes())


def test_missing_short_and_unusable_data_are_refused(tmp_path):
    with pytest.raises(ValueError, match="data: data file .*nope.txt does not exist"):
        read_corpus(tmp_path / "nope.txt", vocab_size=256, seq_len=8)
    short = tmp_path / "short.txt"
    short.write_text("abc")
    with pytest.raises(ValueError, match="has 3 bytes; seq_len \\+ 1 = 9 needed"):
        read_corpus(short, vocab_size=256, seq_len=8)
    with pytest.raises(ValueError, match="model.vocab_size: .* vocab_size is 128"):
        next(batches(vocab_size=128, seq_len=8, global_batch=2, seed=0, data=SHIPPED_TEXT))
    both = text_data_violations(short, vocab_size=128, seq_len=8)
    assert [(v.field, v.code) for v in both] == [
        ("model.vocab_size", "vocab_too_small_for_bytes"),
        ("data", "data_too_short"),
    ]
