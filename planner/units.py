"""Byte units, and the one way paraplan writes a byte count whose unit is picked for it.

Binary units throughout (1 GiB = 2**30 bytes): torch reports memory in them (``torch.cuda.memory_allocated``,
``get_device_properties().total_memory``), GPU capacities are compared in them, and collective messages are powers
of two. Most byte counts are printed in a fixed unit (``f"{peak / GiB:.2f} GiB"``, a table column of GiB), so that
numbers side by side compare; only a list of sizes of very different magnitude (a collective sweep's messages) has
its unit picked per number, by `binary_size`.

Not rich.filesize: its one public formatter, ``decimal``, writes SI units (1 GB = 10**9 bytes) and rounds, so a
4 MiB message would read "4.2 MB" beside memory in GiB; and the planner imports no rich (pyproject's import
contracts)."""

from __future__ import annotations

KiB = 2**10
MiB = 2**20
GiB = 2**30

_UNITS = (("GiB", GiB), ("MiB", MiB), ("KiB", KiB))


def binary_size(size_bytes: int) -> str:
    """`size_bytes` in the largest binary unit it reaches, shortest exact form: "4 MiB", "1.5 KiB", "512 B"."""
    for unit, scale in _UNITS:
        if size_bytes >= scale:
            return f"{size_bytes / scale:g} {unit}"
    return f"{size_bytes} B"
