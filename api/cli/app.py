"""The `paraplan` Typer application, its command groups, and what every command shares: bad input exits 1,
errors printed as text or as `--json`'s `error` object, rich consoles for people.

Exit codes: 0 an answer, 1 bad input or an invalid plan, 2 the plan does not fit (`estimate`, `export`),
`paraplan plan` found nothing that fits, or (`train`) another run holds its --out; `train`, `profile` and
`validate` add 3 (a run failed) and 130 (stopped).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from api.commands import flags
from api.errors import error_text

EXIT_OK, EXIT_BAD_INPUT = 0, 1
EXIT_NOTHING_FITS = 2  # the plan does not fit (estimate, export), or `plan` found none that does
EXIT_RUN_FAILED = 3  # a rank failed (training, profiling, a validation's runs): the output says which and why

# typer re-exports click's BadParameter but not its base class, click's UsageError, which every
# command-line syntax error (unknown option, value of the wrong type, missing argument) derives from.
_UsageError: type[Exception] = typer.BadParameter.__base__  # type: ignore[assignment]


@contextmanager
def _usage_errors_exit_one() -> Iterator[None]:
    try:
        yield
    except _UsageError as error:
        error.exit_code = EXIT_BAD_INPUT  # type: ignore[attr-defined]
        raise


class _BadInputExitsOne(TyperGroup):
    """Command-line syntax errors exit 1 like every other bad input: click's default, 2, is the exit code
    `paraplan plan` keeps for "nothing fits", and a script must be able to tell the two apart."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _usage_errors_exit_one():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _usage_errors_exit_one():
            return super().invoke(ctx)


app = typer.Typer(
    cls=_BadInputExitsOne,
    name="paraplan",
    help="Predict, plan and check parallel training of large models with PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


catalog_app = typer.Typer(cls=_BadInputExitsOne, help="List the model and GPU presets.", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")
profile_app = typer.Typer(
    cls=_BadInputExitsOne,
    help="Measure this machine (layer compute, collectives) into a HardwareProfile that plans can use.",
    no_args_is_help=True,
)
app.add_typer(profile_app, name="profile")


def print_error(payload: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"error": payload}, indent=2))
    else:
        typer.echo(error_text(payload), err=True)  # plain text: long preset lists must not be re-wrapped


def console(stderr: bool = False) -> Console:
    """Rich output for people; with `stderr`, on standard error, so that a command's --json keeps standard output
    to its JSON."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console.width = max(console.width, 120)  # pipes and logs: do not wrap the tables at 80 columns
    return console


def error_payload(exc: ValueError) -> dict[str, Any]:
    """The `error` object of `--json` output: the commands' payload, naming the flag of each request field at
    fault (api/cli/flags.py `flag_for_field`)."""
    from api.cli.flags import flag_for_field

    return flags.error_payload(exc, flag_for_field)


def bad_input(exc: ValueError) -> typer.Exit:
    print_error(error_payload(exc), as_json=False)
    return typer.Exit(EXIT_BAD_INPUT)


def run_failed(exc: Exception) -> typer.Exit:
    console().print(str(exc), style="red", markup=False, highlight=False)
    return typer.Exit(EXIT_RUN_FAILED)
