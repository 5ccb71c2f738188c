"""`paraplan validate`: the flags turned into the command's options record (api/commands/validate.py), the
closed loop (api/commands/loop/) run with rich progress, its figures shown as a table or printed as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from api.cli.app import app, bad_input, run_failed
from api.cli.app import console as _console
from api.commands.defaults import ALL_TECHNIQUES, DEFAULT_STEPS, DEFAULT_TECHNIQUES, VALIDATION_MODEL
from api.commands.inputs import model_from_flag, parse_int_list
from api.errors import InputError


@app.command()
def validate(
    nproc: Annotated[int, typer.Option("--nproc", help="Ranks on this machine; every plan uses all of them.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the profile, the runs, report.md and the plot.")],
    model: Annotated[str, typer.Option("--model", help="Preset name, ModelSpec JSON file or inline JSON.")] = (
        VALIDATION_MODEL
    ),
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")] = 128,
    global_batch: Annotated[int, typer.Option("--global-batch", help="Sequences per optimizer step.")] = 8,
    profile: Annotated[
        str | None, typer.Option("--profile", help="Use this profile (file or stored id) instead of measuring one.")
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="Steps each plan trains.", min=2)] = DEFAULT_STEPS,
    warm_steps: Annotated[int, typer.Option("--warm-steps", help="First steps left out of the median.", min=0)] = 4,
    passes: Annotated[
        int,
        typer.Option(
            "--passes",
            help="Run every plan this many times, in alternating order, steps pooled; with more than one, a profile "
            "pass is measured before each pass of runs and the profiles pooled.",
            min=1,
        ),
    ] = 1,
    paired: Annotated[
        bool,
        typer.Option(
            "--paired",
            help="Profile each plan's layer shapes again just before its run and predict the run from that profile "
            "(with --passes 1): the cost model's error without the machine's drift between profile and run.",
        ),
    ] = False,
    confirm: Annotated[
        int,
        typer.Option(
            "--confirm",
            help="Then run the plans predicted and measured fastest this many times more, alternating, pooled, until "
            "the fastest is one run again (a few plans at most): the regret then compares times that repeat. 0: none.",
            min=0,
        ),
    ] = 3,
    max_plans: Annotated[
        int | None, typer.Option("--max-plans", help="Run at most this many plans, spread over the space.", min=2)
    ] = None,
    zero: Annotated[str | None, typer.Option("--zero", help="ZeRO stages to include, e.g. 0,1.")] = None,
    mbs: Annotated[str | None, typer.Option("--mbs", help="Micro-batch sizes to include.")] = None,
    recompute: Annotated[str | None, typer.Option("--recompute", help="Recompute modes to include.")] = None,
    schedule: Annotated[str | None, typer.Option("--schedule", help="Pipeline schedules to include.")] = None,
    techniques: Annotated[
        str | None,
        typer.Option(
            "--techniques",
            help="Technique entries to add to the plans, each where this machine can run it (else left out with "
            f"the reason): some of {','.join(ALL_TECHNIQUES)}, all or none. ep trains the model with "
            "experts added. Default: " + (",".join(DEFAULT_TECHNIQUES) or "none") + ".",
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu (gloo, fp32) or cuda (NCCL, bf16).")] = "cpu",
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPU preset of the cuda device, e.g. h100-sxm.")] = None,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads per rank, profile and runs.", min=1)] = 1,
    store: Annotated[
        bool, typer.Option("--store/--no-store", help="Store measured runs and the calibrated profile in the database.")
    ] = True,
    runs: Annotated[
        Path | None,
        typer.Option("--runs", help="An earlier validation's runs.json: compare and recalibrate without running."),
    ] = None,
    job_id: Annotated[str | None, typer.Option("--job-id", hidden=True)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Profile this machine, run every valid plan, compare predictions with the runs and recalibrate.

    With --runs, nothing is profiled or run: the runs an earlier validation measured (with the same flags) are
    predicted again by the cost model as it is now, from --profile or else the profile.json beside them.

    Exit 0 with a report (report.md, validation.png, calibrated-profile.json in --out), 1 on bad input,
    3 when profiling failed or fewer than two plans ran, 130 when stopped."""
    flags = dict(locals())
    import sys

    from api.cli.progress import RichProgress
    from api.commands.cancel import with_interrupt
    from api.commands.loop.records import RUNS_FILE
    from api.commands.loop.setup import ValidationStopped
    from api.commands.train import EXIT_STOPPED
    from api.commands.validate import run

    command = "paraplan " + " ".join(sys.argv[1:])
    try:
        options = options_of(flags)
        progress = RichProgress(_console(stderr=as_json))  # with --json, stdout holds the figures alone
        finished = with_interrupt(lambda cancel: run(options, progress, cancel, command))
    except ValidationStopped as exc:
        kept = f"; the runs measured so far are in {out / RUNS_FILE}" if (out / RUNS_FILE).is_file() else ""
        _console(stderr=as_json).print(f"stopped: {exc}{kept}", style="yellow", markup=False)
        raise typer.Exit(EXIT_STOPPED) from None
    except ValueError as exc:
        raise bad_input(exc) from None
    except RuntimeError as exc:  # ProfileRunError, or too few plans ran
        raise run_failed(exc) from None
    if as_json:
        typer.echo(json.dumps(finished.figures_json()))
        return
    _print_validation(finished.result, finished.report, finished.plot, finished.stored)


# The search-space flags: comma-separated lists, of integers for some.
_LIST_FLAGS = {"zero": int, "mbs": int, "recompute": str, "schedule": str}


def options_of(flags: dict[str, Any]) -> Any:
    """The options record of `validate` from its flags' values: the model resolved (a preset, a ModelSpec file or
    inline JSON), the lists split; InputError naming the flag at fault otherwise."""
    from pydantic import ValidationError

    from api.commands.validate import ValidateOptions
    from planner.request import resolve_model
    from planner.specs import ModelSpec

    values = {name: value for name, value in flags.items() if name != "as_json" and value is not None}
    if "techniques" in values:
        values["techniques"] = technique_names(values["techniques"])
    for name, kind in _LIST_FLAGS.items():
        if name in values:
            flag, text = "--" + name, values[name]
            values[name] = parse_int_list(flag, text) if kind is int else tuple(v.strip() for v in text.split(","))
    try:
        values["model"] = ModelSpec.model_validate(resolve_model(model_from_flag(values["model"])))
    except ValidationError as exc:
        problem = exc.errors()[0]
        raise InputError(
            f"--model: {problem['msg']}", fields=[{"field": "--model", "message": problem["msg"]}]
        ) from None
    return ValidateOptions(**values)


def technique_names(text: str) -> tuple[str, ...]:
    """`--techniques`: a comma-separated list, `all` or `none` (checked against the known names by the command)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if names == ("all",):
        return ALL_TECHNIQUES
    return () if names == ("none",) else names


def validation_setup(
    nproc: int, out: Path, model: str, seq_len: int, global_batch: int, steps: int, warm_steps: int,
    max_plans: int | None, zero: str | None, mbs: str | None, recompute: str | None, schedule: str | None,
    device: str, gpu: str | None, threads: int, passes: int = 1, paired: bool = False, confirm: int = 3,
) -> Any:  # fmt: skip
    """The loop's ValidationSetup the flags describe (as `paraplan validate` takes them); InputError naming the
    flag otherwise."""
    flags = dict(locals())
    from api.commands.validate import setup_of

    return setup_of(options_of(flags))


def _print_validation(result: Any, report: Path, plot: Path, stored: str | None) -> None:
    table = Table(title="predicted vs measured step time")
    for column in ("figure", "before calibration", "after (held out)"):
        table.add_column(column, justify="right")
    for label, name, form in (("MAPE", "mape", "{:.1%}"), ("Kendall tau", "kendall_tau", "{:.3f}"),
                              ("top-1 regret", "regret", "{:.1%}")):  # fmt: skip
        table.add_row(label, form.format(getattr(result.before, name)), form.format(getattr(result.after, name)))
    _console().print(table)
    typer.echo(f"report: {report}\nplot: {plot}")
    calibrated = stored or report.with_name("calibrated-profile.json")
    typer.echo(f"calibrated profile: {calibrated} (estimate with --profile {calibrated})")
