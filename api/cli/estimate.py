"""`paraplan estimate` and `paraplan plan`: the request from a file and flags (api/cli/flags.py), answered by the
commands (api/commands/estimate.py), shown as tables (api/cli/report.py) or as the contract's JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from api.cli.app import EXIT_BAD_INPUT, EXIT_NOTHING_FITS, EXIT_OK, app, error_payload, print_error
from api.cli.flags import (
    FLAG_FIELDS,
    AttentionOption,
    CpOption,
    DpOption,
    EpOption,
    FrameworkOption,
    GlobalBatchOption,
    GpuOption,
    GpusPerNodeOption,
    HostLinkOption,
    HostMemoryOption,
    InterNodeOption,
    IntraNodeOption,
    MbsOption,
    ModelOption,
    NodesOption,
    OffloadOption,
    OptimizerOption,
    PpOption,
    PrecisionOption,
    ProfileOption,
    RecomputeOption,
    ScheduleOption,
    SeqLenOption,
    SpOption,
    TpOption,
    VirtualStagesOption,
    ZeroOption,
    build_request,
    parse_layers_per_stage,
)
from api.commands.inputs import parse_json_object, read_json_object, read_text
from api.errors import InputError


def estimate_one(path: Path | None, model_flag: str | None, flags: dict[str, Any], as_json: bool) -> int:
    from api.cli.report import print_report
    from api.commands.estimate import estimate

    try:
        base = read_json_object(path) if path is not None else {}
        request, result = estimate(build_request(base, model_flag, flags))
    except ValueError as exc:
        print_error(error_payload(exc), as_json)
        return EXIT_BAD_INPUT
    if as_json:
        typer.echo(json.dumps(result.model_dump(mode="json"), indent=2))
    else:
        print_report(request, result)
    return EXIT_OK if result.fits else EXIT_NOTHING_FITS


def estimate_lines(path: Path, model_flag: str | None, flags: dict[str, Any]) -> int:
    """One estimate per line of a `.jsonl` file, one JSON answer per line; a bad line answers its error and
    the others still run. Exit 1 if a line was bad, else 2 if a plan does not fit."""
    from api.commands.estimate import estimate

    try:
        lines = read_text(path).splitlines()
    except InputError as exc:
        print_error(error_payload(exc), as_json=True)
        return EXIT_BAD_INPUT
    failed = overflowed = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            base = parse_json_object(line, f"{path} line {number}")
            result = estimate(build_request(base, model_flag, flags))[1]
            record, overflowed = result.model_dump(mode="json"), overflowed or not result.fits
        except ValueError as exc:
            record, failed = {"line": number, "error": error_payload(exc)}, True
        typer.echo(json.dumps(record))
    return EXIT_BAD_INPUT if failed else EXIT_NOTHING_FITS if overflowed else EXIT_OK


@app.command()
def estimate(
    request: Annotated[
        Path | None,
        typer.Argument(help="A contract request: .json (one request) or .jsonl (one per line, JSON answers)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the contract's JSON answer.")] = False,
    model: ModelOption = None,
    gpu: GpuOption = None,
    nodes: NodesOption = None,
    gpus_per_node: GpusPerNodeOption = None,
    seq_len: SeqLenOption = None,
    global_batch: GlobalBatchOption = None,
    precision: PrecisionOption = None,
    optimizer: OptimizerOption = None,
    attention: AttentionOption = None,
    framework: FrameworkOption = None,
    dp: DpOption = None,
    tp: TpOption = None,
    pp: PpOption = None,
    cp: CpOption = None,
    ep: EpOption = None,
    zero: ZeroOption = None,
    mbs: MbsOption = None,
    sp: SpOption = None,
    recompute: RecomputeOption = None,
    schedule: ScheduleOption = None,
    virtual_stages: VirtualStagesOption = None,
    offload: OffloadOption = None,
    layers_per_stage: Annotated[
        str | None, typer.Option(help="Layers of each model chunk, comma-separated: 10,12,12,10.")
    ] = None,
    intra_node_GBps: IntraNodeOption = None,
    inter_node_GBps: InterNodeOption = None,
    host_link_GBps: HostLinkOption = None,
    host_memory_per_node_bytes: HostMemoryOption = None,
    profile: ProfileOption = None,
) -> None:
    """Predict one training step: time, its breakdown, memory per pipeline stage, and whether it fits.

    Exit 0 when the plan fits, 2 when it does not (the estimate is still shown), 1 on bad input."""
    parameters = dict(locals())
    flags = {name: value for name, value in parameters.items() if name in FLAG_FIELDS}
    try:
        flags["layers_per_stage"] = parse_layers_per_stage(layers_per_stage)
    except InputError as exc:
        print_error(error_payload(exc), as_json or _is_jsonl(request))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if request is not None and _is_jsonl(request):
        raise typer.Exit(estimate_lines(request, model, flags))
    raise typer.Exit(estimate_one(request, model, flags, as_json))


def _is_jsonl(path: Path | None) -> bool:
    return path is not None and path.suffix.lower() == ".jsonl"


@app.command()
def plan(
    request: Annotated[Path | None, typer.Argument(help="A contract request (.json); its `search` is used.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the contract's JSON answer.")] = False,
    top: Annotated[int | None, typer.Option(help="How many plans to rank (default 5).")] = None,
    max_memory_fraction: Annotated[
        float | None, typer.Option(help="A plan fits under this fraction of GPU memory (default 0.9).")
    ] = None,
    memory_safety: Annotated[
        bool | None,
        typer.Option(
            "--memory-safety/--no-memory-safety",
            help="Keep only plans that fit even at the upper memory band of measured runs (default off).",
        ),
    ] = None,
    save_request: Annotated[
        Path | None,
        typer.Option("--save-request", help="Write the best plan as a request that estimate, export and train take."),
    ] = None,
    model: ModelOption = None,
    gpu: GpuOption = None,
    nodes: NodesOption = None,
    gpus_per_node: GpusPerNodeOption = None,
    seq_len: SeqLenOption = None,
    global_batch: GlobalBatchOption = None,
    precision: PrecisionOption = None,
    optimizer: OptimizerOption = None,
    attention: AttentionOption = None,
    framework: FrameworkOption = None,
    dp: DpOption = None,
    tp: TpOption = None,
    pp: PpOption = None,
    cp: CpOption = None,
    ep: EpOption = None,
    zero: ZeroOption = None,
    mbs: MbsOption = None,
    sp: SpOption = None,
    recompute: RecomputeOption = None,
    schedule: ScheduleOption = None,
    virtual_stages: VirtualStagesOption = None,
    offload: OffloadOption = None,
    intra_node_GBps: IntraNodeOption = None,
    inter_node_GBps: InterNodeOption = None,
    host_link_GBps: HostLinkOption = None,
    host_memory_per_node_bytes: HostMemoryOption = None,
    profile: ProfileOption = None,
) -> None:
    """Search for the fastest plans that fit: a ranked table, why the winner wins, what was left out.

    Exit 0 with plans, 2 when nothing fits (the closest candidates are shown), 1 on bad input."""
    parameters = dict(locals())
    flags = {name: value for name, value in parameters.items() if name in FLAG_FIELDS}
    raise typer.Exit(plan_search(request, model, flags, as_json, save_request))


def plan_search(
    path: Path | None, model_flag: str | None, flags: dict[str, Any], as_json: bool, save_to: Path | None = None
) -> int:
    from api.cli.report import print_search
    from api.commands.estimate import search_plans

    try:
        base = read_json_object(path) if path is not None else {}
        request, result = search_plans(build_request(base, model_flag, flags, command="plan"))
        if save_to is not None and result.found:
            save_best_request(request, result, save_to)
    except ValueError as exc:
        print_error(error_payload(exc), as_json)
        return EXIT_BAD_INPUT
    if as_json:
        typer.echo(json.dumps(result.model_dump(mode="json"), indent=2))
    else:
        print_search(request, result)
    return EXIT_OK if result.found else EXIT_NOTHING_FITS


def save_best_request(request: Any, result: Any, path: Path) -> None:
    """The search's best plan as the contract request (planner/export's `request` target), written to `path`."""
    from api.cli.export import write_file
    from planner.export import export_plan
    from planner.request import EstimateRequest

    setup = {"model": request.model, "training": request.training, "cluster": request.cluster}
    best = EstimateRequest.model_validate({**setup, "plan": result.plans[0].plan})
    write_file(path, export_plan(best, "request").text)
