"""The `paraplan` command: a thin typer CLI over the commands layer (api/commands/), one module per command group,
drawing with rich. Nothing outside this package imports it.

Start-up must stay fast (DESIGN.md: `paraplan plan` answers in well under a second), so these modules import
only typer, rich and constants at the top; the commands (pydantic, the planner, numpy) are imported inside the
commands that run them, and torch / FastAPI never.
"""

from __future__ import annotations

from api.cli.app import app

# Importing the command modules registers their commands on `app`, in the order `--help` lists them.
# isort: off
from api.cli import estimate, export, catalog, train, profile, kernels, validate, serve  # noqa: F401, E402
# isort: on


def main() -> None:
    app()


__all__ = ["app", "main"]
