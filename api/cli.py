"""The `paraplan` command (DESIGN.md, "api/"): estimate a plan, search for plans, list the presets.

Start-up must stay fast (DESIGN.md: `paraplan plan` answers in well under a second), so this module imports
only typer and rich at the top; the planner (pydantic, numpy, networkx) is imported inside the commands that
use it, and torch / FastAPI never.

Exit codes: 0 an answer (a plan that does not fit is an answer too), 1 bad input or an invalid plan,
2 `paraplan plan` found nothing that fits; `paraplan train` adds 3 (a rank failed) and 130 (stopped).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from api import errors
from api.errors import InputError, error_text

if TYPE_CHECKING:
    import threading

    from planner.request import EstimateRequest, PlanRequest
    from planner.search.result import SearchResult
    from planner.specs import HardwareProfile, ModelSpec, ParallelPlan, StepEstimate

GiB = 1024**3
EXIT_OK, EXIT_BAD_INPUT = 0, 1

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


# ================================================================================= request from flags

# Each `estimate` flag (by its parameter name) -> where its value goes in the contract request. `--model`
# is not here: it replaces the whole `model` section (see _model_from_flag).
FLAG_FIELDS: dict[str, tuple[str, str]] = {
    "gpu": ("cluster", "gpu"),
    "nodes": ("cluster", "num_nodes"),
    "gpus_per_node": ("cluster", "gpus_per_node"),
    "intra_node_GBps": ("cluster", "intra_node_GBps"),
    "inter_node_GBps": ("cluster", "inter_node_GBps"),
    "profile": ("cluster", "profile"),
    "seq_len": ("training", "seq_len"),
    "global_batch": ("training", "global_batch_size"),
    "precision": ("training", "precision"),
    "optimizer": ("training", "optimizer"),
    "attention": ("training", "attention_kernel"),
    "dp": ("plan", "dp"),
    "tp": ("plan", "tp"),
    "pp": ("plan", "pp"),
    "cp": ("plan", "cp"),
    "zero": ("plan", "zero_stage"),
    "mbs": ("plan", "micro_batch_size"),
    "sp": ("plan", "sequence_parallel"),
    "recompute": ("plan", "recompute"),
    "schedule": ("plan", "schedule"),
    "virtual_stages": ("plan", "virtual_stages"),
    "layers_per_stage": ("plan", "layers_per_stage"),
    "top": ("search", "top_k"),
    "max_memory_fraction": ("search", "max_memory_fraction"),
}

# Flags that change the GPU count or the model-parallel degrees: after one of them, a `plan.dp` read from the
# file no longer matches, so it is dropped and inferred again (unless --dp is given).
_RESHAPING_FLAGS = ("nodes", "gpus_per_node", "tp", "pp", "cp")

# What an estimate cannot do without, and the flag that supplies it.
_REQUIRED: tuple[tuple[str, str | None, str], ...] = (
    ("model", None, "--model"),
    ("cluster", "gpu", "--gpu"),
    ("training", "seq_len", "--seq-len"),
    ("training", "global_batch_size", "--global-batch"),
)


def flag_name(parameter: str) -> str:
    return "--" + parameter.replace("_", "-")


def flag_for_field(field: str) -> str | None:
    """The flag that sets a contract field (or the section holding it), for error messages."""
    if field == "model" or field.startswith("model."):
        return "--model"
    for parameter, (section, name) in FLAG_FIELDS.items():
        if field == f"{section}.{name}" or field.startswith(f"{section}.{name}."):
            return flag_name(parameter)
    return None


def build_request(
    base: dict[str, Any], model_flag: str | None, flags: dict[str, Any], command: str = "estimate"
) -> dict[str, Any]:
    """The contract request: the file's fields (`base`), overridden and filled by the flags given.

    `estimate` takes a `plan` (and ignores a file's `search`); `plan` takes a `search`, where the plan flags
    fix fields (`--tp 8` -> search.fixed.tp), and ignores a file's `plan`."""
    dropped = "search" if command == "estimate" else "plan"
    request = {key: value for key, value in base.items() if key != dropped}
    for section in ("training", "cluster", "plan" if command == "estimate" else "search"):
        value = request.get(section, {})
        # A section that is not an object is left as it is, for validation to name it.
        request[section] = dict(value) if isinstance(value, dict) else value
    if model_flag is not None:
        request["model"] = model_from_flag(model_flag)
    given = {name: value for name, value in flags.items() if value is not None}
    if command == "estimate":
        _drop_stale_dp(request, given)
    for name, value in given.items():
        section, field = FLAG_FIELDS[name]
        holder = request[section] if command == "estimate" or section != "plan" else _fixed_section(request)
        if isinstance(holder, dict):
            holder[field] = value
    _require_inputs(request)
    return request


def _drop_stale_dp(request: dict[str, Any], given: dict[str, Any]) -> None:
    if "dp" not in given and any(name in given for name in _RESHAPING_FLAGS) and isinstance(request["plan"], dict):
        request["plan"].pop("dp", None)


def _fixed_section(request: dict[str, Any]) -> dict[str, Any] | Any:
    """`search.fixed` of a plan request, created when absent (left alone when it is not an object)."""
    search = request["search"]
    if not isinstance(search, dict):
        return search
    fixed = search.get("fixed", {})
    search["fixed"] = dict(fixed) if isinstance(fixed, dict) else fixed
    return search["fixed"]


def _require_inputs(request: dict[str, Any]) -> None:
    missing = []
    for section, field, flag in _REQUIRED:
        holder = request if field is None else request.get(section)
        key = section if field is None else field
        if not isinstance(holder, dict) or holder.get(key) is None:
            path = section if field is None else f"{section}.{field}"
            missing.append({"field": path, "flag": flag, "message": f"required: pass {flag} or set {path}"})
    if missing:
        raise InputError("missing required input", kind="missing_input", fields=missing)


def parse_layers_per_stage(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise InputError(
            f"--layers-per-stage takes comma-separated layer counts such as 10,12,12,10; got {text!r}"
        ) from None


# ====================================================================================== model input


def model_from_flag(value: str) -> Any:
    """`--model`: inline JSON (`{...}`), a JSON file (a ModelSpec or a Hugging Face config.json, or a folder
    holding config.json), or else a preset name, which the request layer resolves."""
    if value.lstrip().startswith("{"):
        return model_from_json(parse_json_object(value, "--model"), "--model", default_name=None)
    path = Path(value)
    if value.endswith(".json") or "/" in value or path.is_dir():
        if path.is_dir():
            path = path / "config.json"
        default_name = path.parent.name if path.name == "config.json" else path.stem
        return model_from_json(read_json_object(path), str(path), default_name=default_name or None)
    return {"name": value}


def is_hf_config(config: dict[str, Any]) -> bool:
    """A Hugging Face config.json names its class; a ModelSpec never has these keys."""
    return "model_type" in config or "architectures" in config


def model_from_json(config: dict[str, Any], source: str, default_name: str | None) -> dict[str, Any]:
    if not is_hf_config(config):
        return config  # a ModelSpec (or a preset with overrides): the request layer validates it
    from pydantic import ValidationError

    from planner.presets import model_from_hf_config

    try:
        model = model_from_hf_config(config)
    except ValidationError as exc:
        problems = "; ".join(f"{f['field']}: {f['message']}" for e in exc.errors() for f in errors.validation_fields(e))
        raise InputError(f"{source}: not a usable Hugging Face config: {problems}") from None
    except ValueError as exc:
        raise InputError(f"{source}: not a usable Hugging Face config: {exc}") from None
    if model.name is None and default_name:
        model = model.model_copy(update={"name": default_name})
    return model.model_dump()


# ========================================================================================= JSON files


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None


def parse_json_object(text: str, source: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InputError(f"{source}: expected a JSON object, got {type(value).__name__}")
    return value


def read_json_object(path: Path) -> dict[str, Any]:
    return parse_json_object(read_text(path), str(path))


# ============================================================================================= errors


def error_payload(exc: ValueError) -> dict[str, Any]:
    """The machine-readable form of a bad-input error (the `error` object of `--json` output), naming the flag
    that sets each field at fault. Anything but the known kinds is a bug and is raised again."""
    from profiler.compute import ComputeSweepError

    if isinstance(exc, ComputeSweepError):  # a sweep field is set by exactly one flag: name the flag
        flag = exc.field if exc.field.startswith("--") else SWEEP_FLAGS.get(exc.field, flag_name(exc.field))
        return {"kind": "bad_input", "message": str(exc), "fields": [{"field": flag, "message": str(exc)}]}
    return errors.error_payload(exc, flag_for_field)


def print_error(payload: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"error": payload}, indent=2))
    else:
        typer.echo(error_text(payload), err=True)  # plain text: long preset lists must not be re-wrapped


# =========================================================================================== estimate


def _console(stderr: bool = False) -> Console:
    """Rich output for people; with `stderr`, on standard error, so that a command's --json keeps standard output
    to its JSON."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console.width = max(console.width, 120)  # pipes and logs: do not wrap the tables at 80 columns
    return console


def parse_request(request: dict[str, Any]) -> EstimateRequest:
    from planner.request import parse_estimate_request

    return parse_estimate_request(request, resolve_profile)


def resolve_profile(ref: str) -> HardwareProfile:
    """`cluster.profile` -> the profile: a file, or an id stored in the database (imported only when asked)."""
    from profiler.store import resolve_profile as resolve

    return resolve(ref)


def estimate_json(request: dict[str, Any]) -> dict[str, Any]:
    import planner

    return planner.estimate(parse_request(request)).model_dump(mode="json")


def estimate_one(path: Path | None, model_flag: str | None, flags: dict[str, Any], as_json: bool) -> int:
    import planner

    try:
        base = read_json_object(path) if path is not None else {}
        request = parse_request(build_request(base, model_flag, flags))
        result = planner.estimate(request)
    except ValueError as exc:
        print_error(error_payload(exc), as_json)
        return EXIT_BAD_INPUT
    if as_json:
        typer.echo(json.dumps(result.model_dump(mode="json"), indent=2))
    else:
        print_report(request, result)
    return EXIT_OK


def estimate_lines(path: Path, model_flag: str | None, flags: dict[str, Any]) -> int:
    """One estimate per line of a `.jsonl` file, one JSON answer per line; a bad line answers its error and
    the others still run."""
    try:
        lines = read_text(path).splitlines()
    except InputError as exc:
        print_error(error_payload(exc), as_json=True)
        return EXIT_BAD_INPUT
    failed = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            base = parse_json_object(line, f"{path} line {number}")
            record = estimate_json(build_request(base, model_flag, flags))
        except ValueError as exc:
            record, failed = {"line": number, "error": error_payload(exc)}, True
        typer.echo(json.dumps(record))
    return EXIT_BAD_INPUT if failed else EXIT_OK


# Options `estimate` and `plan` share: the model, the training setup and the cluster.
ModelOption = Annotated[
    str | None,
    typer.Option("--model", help="Preset name, ModelSpec JSON file, Hugging Face config.json, or inline JSON {...}."),
]
GpuOption = Annotated[str | None, typer.Option("--gpu", help="GPU preset, e.g. a100-80gb, h100-sxm.")]
NodesOption = Annotated[int | None, typer.Option("--nodes", help="Nodes (default 1).")]
GpusPerNodeOption = Annotated[int | None, typer.Option("--gpus-per-node", help="GPUs per node (default 8).")]
SeqLenOption = Annotated[int | None, typer.Option("--seq-len", help="Tokens per sequence.")]
GlobalBatchOption = Annotated[int | None, typer.Option("--global-batch", help="Sequences per optimizer step.")]
PrecisionOption = Annotated[
    str | None, typer.Option("--precision", help="bf16 (default; fp32 with --gpu cpu), fp16 or fp32.")
]
OptimizerOption = Annotated[str | None, typer.Option("--optimizer", help="adamw (default) or sgd.")]
AttentionOption = Annotated[str | None, typer.Option("--attention", help="flash (default) or eager attention kernel.")]
IntraNodeOption = Annotated[
    float | None, typer.Option("--intra-node-GBps", help="Override the GPU's intra-node link, GB/s.")
]
InterNodeOption = Annotated[
    float | None, typer.Option("--inter-node-GBps", help="Override the GPU's inter-node link, GB/s.")
]
ProfileOption = Annotated[
    str | None,
    typer.Option("--profile", help="A HardwareProfile file or stored id (paraplan profile): plan from measurements."),
]


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
    dp: Annotated[int | None, typer.Option(help="Data-parallel degree (default: GPUs / (tp x pp x cp)).")] = None,
    tp: Annotated[int | None, typer.Option(help="Tensor-parallel degree.")] = None,
    pp: Annotated[int | None, typer.Option(help="Pipeline-parallel degree.")] = None,
    cp: Annotated[int | None, typer.Option(help="Context-parallel degree.")] = None,
    zero: Annotated[int | None, typer.Option(help="ZeRO stage 0-3.")] = None,
    mbs: Annotated[int | None, typer.Option(help="Micro-batch size (sequences).")] = None,
    sp: Annotated[bool | None, typer.Option("--sp/--no-sp", help="Sequence parallelism (needs tp > 1).")] = None,
    recompute: Annotated[str | None, typer.Option(help="none, selective or full.")] = None,
    schedule: Annotated[str | None, typer.Option(help="gpipe, 1f1b or interleaved_1f1b.")] = None,
    virtual_stages: Annotated[int | None, typer.Option(help="Model chunks per device (interleaved).")] = None,
    layers_per_stage: Annotated[
        str | None, typer.Option(help="Layers of each model chunk, comma-separated: 10,12,12,10.")
    ] = None,
    intra_node_GBps: IntraNodeOption = None,
    inter_node_GBps: InterNodeOption = None,
    profile: ProfileOption = None,
) -> None:
    """Predict one training step: time, its breakdown, memory per pipeline stage, and whether it fits."""
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


# ============================================================================================= report


def print_report(request: EstimateRequest, result: StepEstimate) -> None:
    console = _console()
    console.print(_header(request), highlight=False)
    console.print()
    console.print(_headline(result))
    console.print()
    console.print(_breakdown_table(result))
    console.print(_memory_table(result))
    _print_fit(console, result)
    if result.assumptions:
        console.print("\n[bold]Assumptions[/bold]")
        for note in result.assumptions:
            console.print(f"  - {note}", markup=False, highlight=False)


def _header(request: EstimateRequest | PlanRequest) -> str:
    from planner.cost.params import model_params

    model, cluster, training = request.model, request.cluster, request.training
    nodes = f"{cluster.num_nodes} node{'s' if cluster.num_nodes > 1 else ''}"
    gpus = f"{cluster.num_gpus} × {cluster.gpu.name} ({nodes} × {cluster.gpus_per_node})"
    setup = (
        f"seq {training.seq_len} · global batch {training.global_batch_size} · {training.precision} · "
        f"{training.optimizer} · {training.attention_kernel} attention"
    )
    lines = [f"[bold]{_model_name(model)}[/bold] · {format_count(model_params(model))} params · {gpus}", setup]
    plan = getattr(request, "plan", None)  # a search request has none
    if plan is not None:
        lines.append(f"plan: {plan_summary(plan)}")
    return "\n".join(lines)


def _model_name(model: ModelSpec) -> str:
    from rich.markup import escape

    return escape(model.name or "custom model")


def plan_summary(plan: ParallelPlan) -> str:
    """One line, e.g. "dp16 tp8 pp8 cp1 · ZeRO-1 · mbs 1 · sp · selective · interleaved_1f1b v3"."""
    degrees = f"dp{plan.dp} tp{plan.tp} pp{plan.pp} cp{plan.cp}"
    parts = [degrees, f"ZeRO-{plan.zero_stage}", f"mbs {plan.micro_batch_size}"]
    if plan.sequence_parallel:
        parts.append("sp")
    parts.append("no recompute" if plan.recompute == "none" else f"{plan.recompute} recompute")
    parts.append(plan.schedule + (f" v{plan.virtual_stages}" if plan.virtual_stages > 1 else ""))
    if plan.layers_per_stage is not None:
        parts.append("layers " + ",".join(str(n) for n in plan.layers_per_stage))
    return " · ".join(parts)


def _headline(result: StepEstimate) -> Table:
    table = Table.grid(padding=(0, 3))
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("Step time", format_seconds(result.step_time_s)),
        ("Tokens/s", f"{result.tokens_per_s:,.0f}"),
        ("Tokens/s per GPU", f"{result.tokens_per_s_per_gpu:,.1f}"),
        ("Model TFLOP/s per GPU", f"{result.model_tflops_per_gpu:.1f}"),
        ("MFU", f"{result.mfu:.1%}"),
        ("HFU", f"{result.hfu:.1%}"),
        ("Micro-batches", str(result.num_microbatches)),
    ]
    for label, value in rows:
        table.add_row(label, value)
    return table


# The breakdown's terms in the order they happen, with what each one means for a reader.
_TERM_LABELS = {
    "compute_s": "compute",
    "tp_comm_s": "tensor-parallel comm",
    "cp_comm_s": "context-parallel comm",
    "pp_comm_s": "pipeline p2p comm",
    "dp_comm_s": "data-parallel comm (exposed)",
    "bubble_s": "pipeline bubble",
    "optimizer_s": "optimizer step",
}


def _breakdown_table(result: StepEstimate) -> Table:
    table = Table(title="Step time breakdown", title_justify="left")
    table.add_column("term")
    table.add_column("seconds", justify="right")
    table.add_column("% of step", justify="right")
    table.add_column("from")
    step = result.step_time_s
    for term, seconds in result.breakdown.model_dump().items():
        source = result.sources.get(term, "analytic")
        table.add_row(_TERM_LABELS.get(term, term), f"{seconds:.4f}", f"{seconds / step:.1%}", source)
    table.add_row("[bold]total[/bold]", f"{step:.4f}", "100.0%", "")
    return table


def _memory_table(result: StepEstimate) -> Table:
    memory = result.memory
    table = Table(title="Memory per GPU, by pipeline stage (GiB)", title_justify="left")
    for column in ("stage", "layers", "params", "grads", "optimizer", "activations", "other", "total", "capacity"):
        table.add_column(column, justify="right")
    table.add_column("status")
    for stage in memory.by_stage:
        amounts = (stage.params_bytes, stage.grads_bytes, stage.optimizer_bytes, stage.activations_bytes,
                   stage.other_bytes, stage.total_bytes, stage.capacity_bytes)  # fmt: skip
        status = f"[red]over by {stage.over_bytes / GiB:.2f}[/red]" if stage.over_bytes > 0 else "fits"
        label = f"{stage.stage}*" if stage.stage == memory.peak_stage else str(stage.stage)
        table.add_row(label, str(stage.layers), *(f"{amount / GiB:.2f}" for amount in amounts), status)
    table.caption = "* peak stage"
    return table


def _print_fit(console: Console, result: StepEstimate) -> None:
    memory = result.memory
    peak = f"peak {memory.peak_bytes / GiB:.2f} GiB on stage {memory.peak_stage}"
    peak += f" of {memory.capacity_bytes / GiB:.2f} GiB"
    if result.fits:
        console.print(f"[bold green]FITS[/bold green]: {peak}")
        return
    console.print(f"[bold red]DOES NOT FIT[/bold red]: {peak}")
    for reason in result.why_not_fits:
        console.print(f"  - {reason}", markup=False, highlight=False)


def format_seconds(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def format_count(count: float) -> str:
    """Parameter counts as people quote them: 174.6B, 8.0B, 124.4M."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(int(count))


# =============================================================================================== plan

EXIT_NOTHING_FITS = 2


@app.command()
def plan(
    request: Annotated[Path | None, typer.Argument(help="A contract request (.json); its `search` is used.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the contract's JSON answer.")] = False,
    top: Annotated[int | None, typer.Option(help="How many plans to rank (default 5).")] = None,
    max_memory_fraction: Annotated[
        float | None, typer.Option(help="A plan fits under this fraction of GPU memory (default 0.9).")
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
    dp: Annotated[int | None, typer.Option(help="Keep the data-parallel degree fixed.")] = None,
    tp: Annotated[int | None, typer.Option(help="Keep the tensor-parallel degree fixed.")] = None,
    pp: Annotated[int | None, typer.Option(help="Keep the pipeline-parallel degree fixed.")] = None,
    cp: Annotated[int | None, typer.Option(help="Keep the context-parallel degree fixed.")] = None,
    zero: Annotated[int | None, typer.Option(help="Keep the ZeRO stage fixed.")] = None,
    mbs: Annotated[int | None, typer.Option(help="Keep the micro-batch size fixed.")] = None,
    sp: Annotated[bool | None, typer.Option("--sp/--no-sp", help="Keep sequence parallelism on or off.")] = None,
    recompute: Annotated[str | None, typer.Option(help="Keep recompute fixed: none, selective or full.")] = None,
    schedule: Annotated[str | None, typer.Option(help="Keep the schedule fixed.")] = None,
    virtual_stages: Annotated[int | None, typer.Option(help="Keep the virtual-stage count fixed.")] = None,
    intra_node_GBps: IntraNodeOption = None,
    inter_node_GBps: InterNodeOption = None,
    profile: ProfileOption = None,
) -> None:
    """Search for the fastest plans that fit: a ranked table, why the winner wins, what was left out.

    Exit 0 with plans, 2 when nothing fits (the closest candidates are shown), 1 on bad input."""
    parameters = dict(locals())
    flags = {name: value for name, value in parameters.items() if name in FLAG_FIELDS}
    raise typer.Exit(plan_search(request, model, flags, as_json))


def plan_search(path: Path | None, model_flag: str | None, flags: dict[str, Any], as_json: bool) -> int:
    from planner.request import parse_plan_request
    from planner.search import search

    try:
        base = read_json_object(path) if path is not None else {}
        request = parse_plan_request(build_request(base, model_flag, flags, command="plan"), resolve_profile)
        result = search(request)
    except ValueError as exc:
        print_error(error_payload(exc), as_json)
        return EXIT_BAD_INPUT
    if as_json:
        typer.echo(json.dumps(result.model_dump(mode="json"), indent=2))
    else:
        print_search(request, result)
    return EXIT_OK if result.found else EXIT_NOTHING_FITS


def print_search(request: PlanRequest, result: SearchResult) -> None:
    console = _console()
    console.print(_header(request), highlight=False)
    console.print()
    if result.found:
        console.print(_ranked_table(result))
        _print_explanation(console, result)
    elif result.closest:
        console.print(
            f"[bold red]NO PLAN FITS[/bold red] under {result.memory_limit_bytes / GiB:.2f} GiB per GPU "
            "(search.max_memory_fraction x GPU memory). The closest candidates:"
        )
        console.print(_closest_table(result))
    else:
        console.print("[bold red]NO VALID PLAN[/bold red]: every layout breaks a rule (see what was left out).")
    _print_counts(console, result)


def _ranked_table(result: SearchResult) -> Table:
    table = Table(title="Fastest plans that fit", title_justify="left")
    for column in ("#", "plan", "step", "tokens/s", "MFU", "peak GiB"):
        table.add_column(column, justify="left" if column == "plan" else "right")
    for ranked in result.plans:
        est = ranked.estimate
        table.add_row(
            str(ranked.rank),
            plan_summary(ranked.plan),
            format_seconds(est.step_time_s),
            f"{est.tokens_per_s:,.0f}",
            f"{est.mfu:.1%}",
            f"{est.memory.peak_bytes / GiB:.2f}",
        )
    return table


def _closest_table(result: SearchResult) -> Table:
    table = Table()
    for column in ("plan", "step", "peak GiB", "over GiB", "on stage"):
        table.add_column(column, justify="left" if column == "plan" else "right")
    for near in result.closest:
        table.add_row(
            plan_summary(near.plan),
            format_seconds(near.estimate.step_time_s),
            f"{near.estimate.memory.peak_bytes / GiB:.2f}",
            f"{near.over_bytes / GiB:.2f}",
            str(near.over_stage),
        )
    return table


def _print_explanation(console: Console, result: SearchResult) -> None:
    explanation = result.explanation
    assert explanation is not None  # a search that found plans explains the winner
    console.print("[bold]Why this plan[/bold]")
    for line in explanation.summary:
        console.print(f"  - {line}", markup=False, highlight=False)
    for row in explanation.versus_runner_up[:4]:
        verb = "saves" if row.difference_s > 0 else "costs"
        console.print(
            f"    {verb} {abs(row.difference_s):.3f} s of {_TERM_LABELS.get(row.term, row.term)} "
            f"({row.winner_s:.3f} s vs {row.runner_up_s:.3f} s)",
            highlight=False,
        )
    console.print(f"  - binding constraint: {explanation.binding_constraint}", markup=False, highlight=False)


def _print_counts(console: Console, result: SearchResult) -> None:
    counts, timing = result.counts, result.timing
    console.print(
        f"\n{counts.enumerated:,} candidates from {counts.layouts} layouts; {counts.evaluated:,} costed "
        f"({counts.fits:,} fit, {counts.out_of_memory:,} out of memory), {counts.pruned_by_bound:,} pruned by the "
        f"bound, {counts.partitioned} re-split by the ILP; {timing.total_s:.2f} s "
        f"({timing.candidates_per_s:,.0f} candidates/s)",
        highlight=False,
    )
    if result.rejected:
        console.print("[bold]Left out[/bold]")
        for rejection in result.rejected[:8]:
            console.print(
                f"  {rejection.count:>10,} {rejection.level}s  {rejection.code}: {rejection.example}",
                markup=False,
                highlight=False,
            )


# ============================================================================================ catalog


@catalog_app.command("models")
def catalog_models(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """The model presets: shape and parameter count."""
    from planner.cost.params import model_params
    from planner.presets import MODEL_PRESETS

    if as_json:
        rows = [{**spec.model_dump(mode="json"), "params": model_params(spec)} for spec in MODEL_PRESETS.values()]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Model presets", title_justify="left")
    for column in ("name", "layers", "hidden", "heads", "kv heads", "ffn", "vocab", "params"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for name, spec in MODEL_PRESETS.items():
        shape = (spec.num_layers, spec.hidden_size, spec.num_attention_heads, spec.kv_heads, spec.ffn_size,
                 spec.vocab_size)  # fmt: skip
        table.add_row(name, *(str(n) for n in shape), format_count(model_params(spec)))
    _console().print(table)


@catalog_app.command("gpus")
def catalog_gpus(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """The GPU presets: memory, dense peak, memory and link bandwidths (line rates)."""
    from planner.presets import GPU_PRESETS

    if as_json:
        typer.echo(json.dumps([spec.model_dump(mode="json") for spec in GPU_PRESETS.values()], indent=2))
        return
    table = Table(title="GPU presets", title_justify="left")
    for column in ("name", "memory GiB", "peak bf16 TFLOP/s", "HBM GB/s", "intra-node GB/s", "inter-node GB/s"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for name, gpu in GPU_PRESETS.items():
        table.add_row(
            name,
            f"{gpu.memory_bytes / GiB:.1f}",
            f"{gpu.peak_tflops['bf16']:g}",
            f"{gpu.hbm_GBps:g}",
            f"{gpu.intra_node.bandwidth_GBps:g} ({gpu.intra_node.name})",
            f"{gpu.inter_node.bandwidth_GBps:g} ({gpu.inter_node.name})",
        )
    _console().print(table)


# ============================================================================================= train

# Options `train` and `launch-script` share: what to run, where, and its hyperparameters.
StepsOption = Annotated[int, typer.Option("--steps", help="Optimizer steps to reach (a resumed run counts on).")]
OutOption = Annotated[Path, typer.Option("--out", help="The run's folder: run.json, metrics.jsonl, checkpoints, logs.")]
DataOption = Annotated[
    Path | None, typer.Option("--data", help="A text file, trained on as bytes (default: synthetic tokens).")
]
ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its newest checkpoint.")]
CheckpointEveryOption = Annotated[
    int, typer.Option("--checkpoint-every", help="Save every N steps (0: at the end and when stopped).")
]
LrOption = Annotated[float, typer.Option("--lr", help="Peak learning rate (warm-up, then cosine).")]
WarmupOption = Annotated[int | None, typer.Option("--warmup-steps", help="Warm-up steps (default 10% of --steps).")]
SeedOption = Annotated[int, typer.Option("--seed", help="Model initialisation and data order.")]
DeviceOption = Annotated[
    str, typer.Option("--device", help="cpu (gloo, fp32) or cuda (NCCL, at the request's precision).")
]


def _train_config(**fields: Any) -> Any:
    from executor.config import TrainConfig

    return TrainConfig(**{name: value for name, value in fields.items() if value is not None})


def _prepare(request: Path, out: Path, nproc: int | None, resume: bool, **config: Any) -> Any:
    """The checked run written to `out`, or None after printing why it cannot start."""
    from executor.prepare import prepare_run

    try:
        return prepare_run(read_json_object(request), _train_config(**config), out, nproc=nproc, resume=resume)
    except ValueError as exc:
        print_error(error_payload(exc), as_json=False)
        return None


@app.command()
def train(
    request: Annotated[Path, typer.Argument(help="A contract request with its `plan` (.json).")],
    steps: StepsOption,
    out: OutOption,
    nproc: Annotated[int | None, typer.Option("--nproc", help="Processes (default: the plan's GPU count).")] = None,
    data: DataOption = None,
    resume: ResumeOption = False,
    checkpoint_every: CheckpointEveryOption = 0,
    lr: LrOption = 3e-4,
    warmup_steps: WarmupOption = None,
    seed: SeedOption = 0,
    device: DeviceOption = "cpu",
) -> None:
    """Train the request's model under its plan on this machine (torchrun, one process per GPU or CPU rank).

    Exit 0 when every step ran, 1 on bad input (nothing started), 3 when a rank failed, 130 when stopped with
    Ctrl-C (after a checkpoint: continue with --resume)."""
    from api.training import exit_code, print_outcome, run_training
    from executor.config import RunDir

    config = dict(steps=steps, data=data, checkpoint_every=checkpoint_every, lr=lr, warmup_steps=warmup_steps,
                  seed=seed, device=device)  # fmt: skip
    run = _prepare(request, out, nproc, resume, **config)
    if run is None:
        raise typer.Exit(EXIT_BAD_INPUT)
    console = _console()
    console.print(_header(run.request), highlight=False)
    result = run_training(run, RunDir(out), run.request.plan.num_gpus, resume, console)
    print_outcome(console, RunDir(out), result)
    raise typer.Exit(exit_code(result))


@app.command("launch-script")
def launch_script(
    request: Annotated[Path, typer.Argument(help="A contract request with its `plan` (.json).")],
    steps: StepsOption,
    out: Annotated[Path, typer.Option("--out", help="The run's folder, on a file system every node shares.")],
    nnodes: Annotated[int, typer.Option("--nnodes", help="Nodes.")] = 1,
    nproc_per_node: Annotated[int | None, typer.Option("--nproc-per-node", help="Processes per node.")] = None,
    rdzv_endpoint: Annotated[
        str | None, typer.Option("--rdzv-endpoint", help="host:port of the c10d rendezvous (on node 0).")
    ] = None,
    sbatch: Annotated[bool, typer.Option("--sbatch", help="Write a Slurm batch script instead.")] = False,
    submit: Annotated[bool, typer.Option("--submit", help="With --sbatch: submit it with sbatch.")] = False,
    job_name: Annotated[str, typer.Option("--job-name", help="Slurm job name.")] = "paraplan",
    time_limit: Annotated[str, typer.Option("--time", help="Slurm time limit.")] = "01:00:00",
    partition: Annotated[str | None, typer.Option("--partition", help="Slurm partition.")] = None,
    data: DataOption = None,
    resume: ResumeOption = False,
    checkpoint_every: CheckpointEveryOption = 0,
    lr: LrOption = 3e-4,
    warmup_steps: WarmupOption = None,
    seed: SeedOption = 0,
    device: DeviceOption = "cuda",
) -> None:
    """Write the run to --out and print the torchrun command for each node (or a Slurm batch script)."""
    from api.training import EXIT_RUN_FAILED, launch_script_text, worker_args
    from executor import launch
    from executor.config import RunDir

    config = dict(steps=steps, data=data, checkpoint_every=checkpoint_every, lr=lr, warmup_steps=warmup_steps,
                  seed=seed, device=device)  # fmt: skip
    per_node = nproc_per_node
    try:
        if submit and not sbatch:
            raise InputError("--submit needs --sbatch")
        if per_node is None:
            per_node = _gpus_per_node(request)
        spec = launch.LaunchSpec(nproc_per_node=per_node, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint,
                                 args=worker_args(RunDir(out), resume))  # fmt: skip
    except ValueError as exc:
        print_error(error_payload(exc), as_json=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    slurm = {"job_name": job_name, "time_limit": time_limit, "partition": partition} if sbatch else None
    try:  # everything that can be refused is checked before run.json is written
        text = launch_script_text(RunDir(out), spec, slurm)
        if submit and shutil.which("sbatch") is None:
            raise InputError("--submit: Slurm's sbatch is not on PATH; drop --submit to print the script")
    except ValueError as exc:
        print_error(error_payload(exc), as_json=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if _prepare(request, out, nnodes * per_node, resume, **config) is None:
        raise typer.Exit(EXIT_BAD_INPUT)
    if not submit:
        typer.echo(text, nl=False)
        return
    try:
        typer.echo(f"submitted batch job {launch.submit_sbatch(text, out)}")
    except ValueError as exc:
        print_error(error_payload(exc), as_json=False)
        raise typer.Exit(EXIT_RUN_FAILED) from None


def _gpus_per_node(request: Path) -> int:
    """The request's cluster.gpus_per_node: the default process count per node."""
    cluster = read_json_object(request).get("cluster")
    value = cluster.get("gpus_per_node") if isinstance(cluster, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError("give --nproc-per-node, or cluster.gpus_per_node in the request")
    return value


# ======================================================================================== profile

EXIT_PROFILE_FAILED = 3  # a profiling run failed (a rank died); as `train`'s failed run

ProfileOutOption = Annotated[Path, typer.Option("--out", help="Where to write the profile (JSON).")]
StoreOption = Annotated[
    bool, typer.Option("--store/--no-store", help="Also store the profile in the database (PARAPLAN_DATABASE_URL).")
]
NameOption = Annotated[str | None, typer.Option("--name", help="A label for the stored profile.")]
ProfileModelOption = Annotated[str, typer.Option("--model", help="Preset name, ModelSpec JSON file or inline JSON.")]
# profiler.collectives.OPS, spelled out so that `paraplan --help` need not import the profiler.
ALL_COLLECTIVES = "all_reduce,all_gather,reduce_scatter,all_to_all,send_recv,fsdp_all_gather,fsdp_reduce_scatter"


# Options `profile compute` and `profile all` share.
SeqLensOption = Annotated[str, typer.Option("--seq-len", help="Sequence lengths, comma-separated.")]
MbsListOption = Annotated[str, typer.Option("--mbs", help="Micro-batch sizes, comma-separated.")]
TpListOption = Annotated[str, typer.Option("--tp", help="Tensor-parallel degrees whose shards to time.")]
RecomputeListOption = Annotated[str, typer.Option("--recompute", help="Recompute modes of the blocks.")]
SweepDeviceOption = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
SweepDtypeOption = Annotated[str, typer.Option("--dtype", help="fp32 (CPU); fp32, bf16 or fp16 (cuda).")]
SweepOptimizerOption = Annotated[str, typer.Option("--optimizer", help="adamw or sgd: the optimizer step to time.")]
WarmupRunsOption = Annotated[int, typer.Option("--warmup", help="Untimed runs per measurement.")]
RepeatsOption = Annotated[int, typer.Option("--repeats", help="Timed runs per measurement.")]
ThreadsOption = Annotated[int | None, typer.Option("--threads", help="CPU threads (torch.set_num_threads).")]
PassesOption = Annotated[int, typer.Option("--passes", help="Run the sweep this many times and pool the samples.")]


def parse_int_list(flag: str, text: str) -> tuple[int, ...]:
    """ "1,2,4" -> (1, 2, 4); InputError naming the flag for anything else."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise InputError(f"{flag}: give at least one value")
    return values


def compute_sweep(
    model: str,
    seq_len: str,
    mbs: str,
    tp: str,
    recompute: str,
    device: str,
    dtype: str,
    optimizer: str,
    warmup: int,
    repeats: int,
    threads: int | None,
    passes: int = 1,
) -> Any:
    """The ComputeSweep the flags describe, or InputError / ComputeSweepError naming the bad flag."""
    from planner.request import resolve_model
    from planner.specs import ModelSpec
    from profiler.compute import ComputeSweep, ComputeSweepError

    spec = ModelSpec.model_validate(resolve_model(model_from_flag(model)))
    sweep = ComputeSweep(
        model=spec, seq_lens=parse_int_list("--seq-len", seq_len), micro_batch_sizes=parse_int_list("--mbs", mbs),
        tps=parse_int_list("--tp", tp), recompute_modes=tuple(m.strip() for m in recompute.split(",")),  # type: ignore[arg-type]
        dtype=dtype, device=device, optimizer=optimizer,  # type: ignore[arg-type]
        warmup=warmup, repeats=repeats, threads=threads, passes=passes,
    )  # fmt: skip
    problems = sweep.violations()
    if problems:
        flags = [SWEEP_FLAGS.get(field, flag_name(field)) for field, _ in problems]
        message = "; ".join(f"{flag}: {why}" for flag, (_, why) in zip(flags, problems, strict=True))
        raise ComputeSweepError(flags[0], message)
    return sweep


# ComputeSweep's fields -> the `profile compute` flag that sets each, for refusals.
SWEEP_FLAGS = {"seq_lens": "--seq-len", "micro_batch_sizes": "--mbs", "tps": "--tp", "recompute_modes": "--recompute"}


def comm_launch(
    out: Path,
    nproc: int,
    nnodes: int,
    rdzv_endpoint: str | None,
    min_bytes: int,
    max_bytes: int,
    ops: str,
    warmup: int,
    repeats: int,
    backend: str | None,
) -> Any:
    """The collective sweep the flags describe, checked before anything starts."""
    from api.profiling import CommLaunch, comm_violations
    from profiler.collectives import sweep_command_args

    problems = comm_violations(nproc, nnodes)
    if problems:
        raise InputError("; ".join(problems), fields=[{"field": "--nproc", "message": p} for p in problems])
    if nnodes > 1 and rdzv_endpoint is None:
        raise InputError("--rdzv-endpoint host:port (node 0's address) is needed with --nnodes > 1")
    try:
        args = sweep_command_args(out, min_bytes, max_bytes, ops, warmup, repeats, backend)
    except ValueError as exc:  # the sweep's own checks start with the flag (--ops, --min-bytes, ...)
        flag = re.match(r"--[a-z][a-z-]*", str(exc))
        raise InputError(str(exc), fields=[{"field": flag.group(0), "message": str(exc)}] if flag else None) from None
    comm = CommLaunch(nproc, nnodes, args, rdzv_endpoint)
    comm.spec()  # LaunchSpec's own checks (ranks, endpoint)
    return comm


def _sweep_file(out: Path) -> Path:
    """Where rank 0 writes the raw sweep: next to the profile, so a multi-node sweep can be turned into one."""
    return out.with_name(out.stem + ".sweep.json")


def _finish_profile(profile: HardwareProfile, out: Path, store: bool, name: str | None) -> None:
    from api.profiling import save

    profile_id = save(profile, out, store, name)
    stored = f" and stored as id {profile_id}" if profile_id else ""
    typer.echo(f"profile written to {out}{stored}; plan with it: --profile {profile_id or out}")


def _bad_input(exc: ValueError) -> typer.Exit:
    print_error(error_payload(exc), as_json=False)
    return typer.Exit(EXIT_BAD_INPUT)


def _run_failed(exc: Exception) -> typer.Exit:
    _console().print(str(exc), style="red", markup=False, highlight=False)
    return typer.Exit(EXIT_PROFILE_FAILED)


@profile_app.command("compute")
def profile_compute(
    out: ProfileOutOption,
    model: ProfileModelOption,
    seq_len: SeqLensOption,
    mbs: MbsListOption = "1,2,4",
    tp: TpListOption = "1",
    recompute: RecomputeListOption = "none,selective,full",
    device: SweepDeviceOption = "cpu",
    dtype: SweepDtypeOption = "fp32",
    optimizer: SweepOptimizerOption = "adamw",
    warmup: WarmupRunsOption = 3,
    repeats: RepeatsOption = 10,
    threads: ThreadsOption = None,
    passes: PassesOption = 1,
    store: StoreOption = True,
    name: NameOption = None,
) -> None:
    """Time each layer of the model (blocks per recompute mode, embedding, head) and the optimizer step here."""
    from api.profiling import layer_table, run_compute

    try:
        sweep = compute_sweep(
            model, seq_len, mbs, tp, recompute, device, dtype, optimizer, warmup, repeats, threads, passes
        )
        profile = run_compute(sweep, _console())
    except ValueError as exc:
        raise _bad_input(exc) from None
    _console().print(layer_table(profile))
    _finish_profile(profile, out, store, name)


@profile_app.command("comm")
def profile_comm(
    out: ProfileOutOption,
    nproc: Annotated[int, typer.Option("--nproc", help="Processes (GPUs) per node.")] = 2,
    nnodes: Annotated[int, typer.Option("--nnodes", help="Nodes; above 1 the per-node commands are printed.")] = 1,
    rdzv_endpoint: Annotated[str | None, typer.Option("--rdzv-endpoint", help="host:port of node 0.")] = None,
    min_bytes: Annotated[int, typer.Option("--min-bytes")] = 1024,
    max_bytes: Annotated[int, typer.Option("--max-bytes")] = 256 * 2**20,
    ops: Annotated[str, typer.Option(help="Collectives, comma-separated.")] = ALL_COLLECTIVES,
    warmup: Annotated[int, typer.Option(help="Untimed runs per size.")] = 5,
    repeats: Annotated[int, typer.Option(help="Timed runs per size.")] = 20,
    backend: Annotated[str | None, typer.Option(help="gloo or nccl (default: nccl with CUDA).")] = None,
    from_sweep: Annotated[
        Path | None, typer.Option("--from-sweep", help="Build the profile from a finished multi-node sweep file.")
    ] = None,
    store: StoreOption = True,
    name: NameOption = None,
) -> None:
    """Sweep collectives over message sizes under torchrun; bus bandwidth per op and size, alpha-beta fits."""
    from api.profiling import ProfileRunError, collective_table, comm_profile, per_node_text, run_comm

    try:
        if from_sweep is not None:
            profile = comm_profile(from_sweep)
        else:
            comm = comm_launch(_sweep_file(out), nproc, nnodes, rdzv_endpoint, min_bytes, max_bytes, ops, warmup,
                               repeats, backend)  # fmt: skip
            if nnodes > 1:
                typer.echo(per_node_text(comm), nl=False)
                typer.echo(f"# then: paraplan profile comm --from-sweep {_sweep_file(out)} --out {out}")
                return
            profile = _with_interrupt(lambda cancel: run_comm(comm, _sweep_file(out), _console(), cancel))
    except ValueError as exc:
        raise _bad_input(exc) from None
    except ProfileRunError as exc:
        raise _run_failed(exc) from None
    _console().print(collective_table(profile))
    _finish_profile(profile, out, store, name)


@profile_app.command("all")
def profile_all(
    out: ProfileOutOption,
    model: ProfileModelOption,
    seq_len: SeqLensOption,
    mbs: MbsListOption = "1,2,4",
    tp: TpListOption = "1",
    recompute: RecomputeListOption = "none,selective,full",
    device: SweepDeviceOption = "cpu",
    dtype: SweepDtypeOption = "fp32",
    optimizer: SweepOptimizerOption = "adamw",
    warmup: WarmupRunsOption = 3,
    repeats: RepeatsOption = 10,
    threads: ThreadsOption = None,
    passes: PassesOption = 1,
    nproc: Annotated[int, typer.Option("--nproc", help="Processes for the collective sweep (one node).")] = 2,
    max_bytes: Annotated[int, typer.Option("--max-bytes", help="Largest collective message.")] = 256 * 2**20,
    store: StoreOption = True,
    name: NameOption = None,
) -> None:
    """Compute and collectives on this node, in one profile. With several processes the layers are also timed as
    they run on them: on tp ranks (each tp degree up to --nproc, tp 1 added) and on every rank busy at once, with
    the optimizer step and the ranks' wait per meeting; plans of several ranks are costed from those."""
    from api.profiling import (
        ProfileRunError,
        collective_table,
        layer_table,
        measure_node,
        merge,
        run_comm,
        sweep_for_ranks,
    )

    try:
        sweep = compute_sweep(
            model, seq_len, mbs, tp, recompute, device, dtype, optimizer, warmup, repeats, threads, passes
        )
        sweep = sweep_for_ranks(sweep, nproc)
        comm = comm_launch(_sweep_file(out), nproc, 1, None, 1024, max_bytes, ALL_COLLECTIVES, warmup, repeats, None)

        def measure(cancel: threading.Event) -> HardwareProfile:
            compute = measure_node(sweep, nproc, _console(), cancel)
            return merge(compute, run_comm(comm, _sweep_file(out), _console(), cancel))

        profile = _with_interrupt(measure)
    except ValueError as exc:
        raise _bad_input(exc) from None
    except ProfileRunError as exc:
        raise _run_failed(exc) from None
    _console().print(layer_table(profile))
    _console().print(collective_table(profile))
    _finish_profile(profile, out, store, name)


# ======================================================================================= validate

# A small Llama (3.3M parameters) whose blocks take milliseconds on one CPU core: what `validate` runs by default.
VALIDATION_MODEL = (
    '{"name": "llama3-8b", "num_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "num_kv_heads": 2, '
    '"ffn_hidden_size": 704, "vocab_size": 256}'
)


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
    # api/validation.py DEFAULT_STEPS says why 20 (spelled out: that module is imported only when needed)
    steps: Annotated[int, typer.Option("--steps", help="Steps each plan trains.", min=2)] = 20,
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
    import sys

    from api.training import EXIT_STOPPED
    from api.validation import RUNS_FILE, ValidationStopped

    try:
        setup = validation_setup(
            nproc, out, model, seq_len, global_batch, steps, warm_steps, max_plans, zero, mbs, recompute, schedule,
            device, gpu, threads, passes, paired, confirm,
        )  # fmt: skip
        if runs is not None and profile is None:
            profile = str(runs.with_name("profile.json"))
        measured = resolve_profile(profile) if profile is not None else None
        console = _console(stderr=as_json)  # progress; with --json, stdout holds the figures alone
        result, stored = _with_interrupt(
            lambda cancel: _run_validation(setup, measured, store, job_id, cancel, console, runs)
        )
    except ValidationStopped as exc:
        kept = f"; the runs measured so far are in {out / RUNS_FILE}" if (out / RUNS_FILE).is_file() else ""
        _console(stderr=as_json).print(f"stopped: {exc}{kept}", style="yellow", markup=False)
        raise typer.Exit(EXIT_STOPPED) from None
    except ValueError as exc:
        raise _bad_input(exc) from None
    except RuntimeError as exc:  # ProfileRunError, or too few plans ran
        raise _run_failed(exc) from None
    from api.validation_report import write_report

    report, plot = write_report(result, stored, "paraplan " + " ".join(sys.argv[1:]))
    (out / "validation.json").write_text(json.dumps(result.figures_json(), indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(result.figures_json() | {"report": str(report), "plot": str(plot),
                                                        "calibrated_profile": stored}))  # fmt: skip
        return
    _print_validation(result, report, plot, stored)


def validation_setup(
    nproc: int, out: Path, model: str, seq_len: int, global_batch: int, steps: int, warm_steps: int,
    max_plans: int | None, zero: str | None, mbs: str | None, recompute: str | None, schedule: str | None,
    device: str, gpu: str | None, threads: int, passes: int = 1, paired: bool = False, confirm: int = 3,
) -> Any:  # fmt: skip
    """The ValidationSetup the flags describe; InputError naming the flag otherwise."""
    from pydantic import ValidationError

    from api.validation import ValidationSetup
    from planner.request import resolve_model
    from planner.specs import ModelSpec, SearchOptions

    if device not in ("cpu", "cuda"):
        raise InputError(f"--device: cpu or cuda, got {device!r}")
    if device == "cuda" and gpu is None:
        raise InputError("--gpu: name the GPU preset of the cuda device (e.g. h100-sxm) so estimates use its memory")
    if paired and passes > 1:
        raise InputError(f"--paired: each plan runs once, right after its own profile; use --passes 1, not {passes}",
                         fields=[{"field": "--paired", "message": "needs --passes 1"}])  # fmt: skip
    if warm_steps >= steps:
        raise InputError(f"--warm-steps: must be below --steps ({steps}), got {warm_steps}", fields=[
            {"field": "--warm-steps", "message": "must be below --steps"}])  # fmt: skip
    lists = {"zero_stages": ("--zero", zero, int), "micro_batch_sizes": ("--mbs", mbs, int),
             "recompute": ("--recompute", recompute, str), "schedules": ("--schedule", schedule, str)}  # fmt: skip
    options = {name: _list_flag(flag, text, kind) for name, (flag, text, kind) in lists.items() if text is not None}
    try:
        search = SearchOptions(**options)
        spec = ModelSpec.model_validate(resolve_model(model_from_flag(model)))
    except ValidationError as exc:
        problem = exc.errors()[0]
        field = str(problem["loc"][0]) if problem["loc"] else "model"
        flag = lists[field][0] if field in lists else "--model"
        raise InputError(f"{flag}: {problem['msg']}", fields=[{"field": flag, "message": problem["msg"]}]) from None
    return ValidationSetup(
        model=spec, seq_len=seq_len, global_batch_size=global_batch, nproc=nproc, out=out, device=device,
        gpu=gpu or "cpu", steps=steps, warm_steps=warm_steps, search=search, max_plans=max_plans, threads=threads,
        passes=passes, paired=paired, confirm=confirm,
    )  # fmt: skip


def _list_flag(flag: str, text: str, kind: type) -> tuple:
    return parse_int_list(flag, text) if kind is int else tuple(v.strip() for v in text.split(","))


def _run_validation(
    setup: Any,
    profile: Any,
    store: bool,
    job_id: str | None,
    cancel: Any,
    console: Console,
    earlier_runs: Path | None = None,
) -> Any:
    from api.store import ApiStore, new_id
    from api.validation import Outputs, validate
    from profiler.store import default_database_url

    database = ApiStore(default_database_url()) if store else None
    outputs = Outputs(store=database, validation_id=job_id or new_id(), job_id=job_id)
    try:
        return validate(setup, profile, outputs, console, cancel, earlier_runs)
    finally:
        if database is not None:
            database.close()


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


# ========================================================================================== serve


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to bind; only this machine by default.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.", min=1, max=65535)] = 8000,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Database, job folders, datasets ($PARAPLAN_DATA_DIR).")
    ] = None,
    max_jobs: Annotated[
        int | None, typer.Option("--max-jobs", help="Jobs run at once; more wait in a queue ($PARAPLAN_MAX_JOBS).")
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn's: critical, error, warning, info.")] = "info",
) -> None:
    """Serve the REST API (OpenAPI docs at /docs). Endpoints that start processes need PARAPLAN_API_TOKEN."""
    import logging

    import uvicorn

    from api.app import create_app
    from api.settings import Settings

    try:
        settings = Settings.from_env(data_dir=data_dir, max_concurrent_jobs=max_jobs)
        application = create_app(settings)
    except ValueError as exc:
        print_error(error_payload(exc), as_json=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = "on" if settings.api_token else "off (profiles and jobs are disabled; set PARAPLAN_API_TOKEN)"
    typer.echo(f"paraplan serving http://{host}:{port} (data: {settings.data_dir}; token: {token})", err=True)
    uvicorn.run(application, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def _with_interrupt(body: Any) -> Any:
    """Run `body(cancel)` with Ctrl-C / SIGTERM setting `cancel`, so torchrun's workers are stopped, not orphaned."""
    import threading

    from api.training import stop_on_interrupt

    cancel = threading.Event()
    with stop_on_interrupt(cancel):
        return body(cancel)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
