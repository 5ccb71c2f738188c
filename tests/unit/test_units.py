"""planner/units.py: the binary units, and sizes written in the largest unit they reach, exactly."""

from __future__ import annotations

import pytest

from planner.units import GiB, KiB, MiB, binary_size


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (1023, "1023 B"), (KiB, "1 KiB"), (1536, "1.5 KiB"), (4 * MiB, "4 MiB"), (256 * MiB, "256 MiB"),
     (3 * GiB, "3 GiB"), (GiB // 2, "512 MiB")],
)  # fmt: skip
def test_a_size_reads_in_the_largest_binary_unit_it_reaches(size: int, text: str) -> None:
    assert binary_size(size) == text
