"""`paraplan export`: a plan as the configuration of the stack that runs it (api/commands/export.py): Megatron-LM's
arguments, DeepSpeed's ds_config.json, torchtitan's TOML, Accelerate's config YAML, or the contract request.

The file goes to standard output (or --out), what to set in code and the plan's estimate under the stack's regime
to standard error (or, with --out, standard output), so `paraplan export r.json --to deepspeed > ds_config.json`
works. Exit 0, 1 on bad input or a plan the stack cannot run (the fields and why), 2 when the exported plan does
not fit (as `estimate`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from api.cli.app import EXIT_BAD_INPUT, EXIT_NOTHING_FITS, EXIT_OK, app, error_payload, print_error
from api.commands.inputs import read_json_object
from api.errors import InputError
from planner.units import GiB

if TYPE_CHECKING:
    from api.commands.export import ExportAnswer

TARGETS_HELP = "megatron, deepspeed, torchtitan, accelerate or request"


def stored_request(plan_id: str, rank: int) -> dict[str, Any]:
    """The `rank`-th plan of a search stored in this machine's database (`paraplan serve`'s)."""
    from api.service import stored_plan_request
    from api.store import ApiStore
    from profiler.store import default_database_url

    store = ApiStore(default_database_url())
    try:
        return stored_plan_request(store, plan_id, rank, rank_field="--rank")
    finally:
        store.close()


def request_to_export(path: Path | None, plan_id: str | None, rank: int) -> dict[str, Any]:
    if (path is None) == (plan_id is None):
        raise InputError("give a request file with `plan`, or --plan-id of a stored search (not both)")
    return read_json_object(path) if path is not None else stored_request(plan_id or "", rank)


def print_summary(answer: ExportAnswer, stderr: bool) -> None:
    estimate = answer.estimate
    fits = "fits" if estimate.fits else "does NOT fit"
    typer.echo(f"{answer.export.target} ({answer.export.filename}), estimated as training.framework="
               f"{answer.export.framework}: {estimate.step_time_s:.3f} s/step, MFU {estimate.mfu:.1%}, "
               f"{estimate.memory.peak_bytes / GiB:.1f} GiB peak, {fits}", err=stderr)  # fmt: skip
    for note in answer.export.notes:
        typer.echo(f"  set in code: {note}", err=stderr)


@app.command("export")
def export_command(
    to: Annotated[str, typer.Option("--to", help=f"The stack: {TARGETS_HELP}.")],
    request: Annotated[Path | None, typer.Argument(help="A contract request with its `plan` (.json).")] = None,
    plan_id: Annotated[
        str | None, typer.Option("--plan-id", help="Instead of a request: a search stored by `paraplan serve`.")
    ] = None,
    rank: Annotated[int, typer.Option("--rank", min=1, help="With --plan-id: which ranked plan (1 = best).")] = 1,
    out: Annotated[Path | None, typer.Option("--out", help="Write the file here instead of standard output.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the file, its stack, notes and estimate as one JSON object.")
    ] = False,
) -> None:
    """Write a plan as its training stack's configuration; refuse, naming the fields, what the stack cannot run.

    Exit 0, 1 on bad input or a plan the stack cannot express, 2 when the plan does not fit."""
    from api.commands.export import export

    try:
        answer = export(request_to_export(request, plan_id, rank), to)
        if out is not None:
            write_file(out, answer.export.text)
    except ValueError as exc:
        print_error(error_payload(exc), as_json)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if as_json:
        typer.echo(json.dumps(answer.to_json(), indent=2))
    elif out is None:
        typer.echo(answer.export.text, nl=False)
        print_summary(answer, stderr=True)
    else:
        print_summary(answer, stderr=False)
    raise typer.Exit(EXIT_OK if answer.estimate.fits else EXIT_NOTHING_FITS)


def write_file(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise InputError.at("--out", f"cannot write {path}: {exc.strerror or exc}") from None
