"""The file formats the stacks read, written from plain values: TOML (torchtitan) and YAML (Accelerate).

Only what the exporters write: mappings of sections (nested mappings) whose leaves are strings, integers, floats,
booleans and (nested) lists of those. No dependency: the planner stays pure Python (DESIGN.md); both texts are
read back by the real parsers in tests/unit/test_export.py (tomllib, torchtitan's ConfigManager; Accelerate's
YAML loader).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

Scalar = str | int | float | bool


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string (TOML 1.0 sec. "String")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def toml_text(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """`{"section": {"key": value}}` as TOML tables, in the order given."""
    blocks = []
    for name, table in sections.items():
        lines = [f"[{name}]", *(f"{key} = {_toml_value(value)}" for key, value in table.items())]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _yaml_scalar(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # Quoted: YAML would read a bare `no`, `1e3` or `NO` as something other than a string.
    return json.dumps(value)


def yaml_text(mapping: Mapping[str, Any], indent: int = 0) -> str:
    """A mapping (nested mappings, scalar leaves) as block YAML."""
    lines = []
    pad = " " * indent
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            lines.append(f"{pad}{key}:")
            lines.append(yaml_text(value, indent + 2).rstrip("\n"))
        else:
            lines.append(f"{pad}{key}: {_yaml_scalar(value)}")
    return "\n".join(lines) + "\n"
