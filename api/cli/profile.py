"""`paraplan profile compute|comm|all`: the flags turned into the commands' options records
(api/commands/profile.py), measured with rich progress bars, shown as tables, saved and stored."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from api.cli.app import bad_input, profile_app, run_failed
from api.cli.app import console as _console
from api.commands.defaults import ALL_COLLECTIVES as COLLECTIVES
from api.commands.inputs import model_from_flag, parse_int_list
from planner.units import MiB, binary_size

if TYPE_CHECKING:
    from planner.specs import HardwareProfile, LayerMeasurement, OptimizerMeasurement

ALL_COLLECTIVES = ",".join(COLLECTIVES)

ProfileOutOption = Annotated[Path, typer.Option("--out", help="Where to write the profile (JSON).")]


StoreOption = Annotated[
    bool, typer.Option("--store/--no-store", help="Also store the profile in the database (PARAPLAN_DATABASE_URL).")
]


NameOption = Annotated[str | None, typer.Option("--name", help="A label for the stored profile.")]


ProfileModelOption = Annotated[str, typer.Option("--model", help="Preset name, ModelSpec JSON file or inline JSON.")]


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


def options_of(what: str, flags: dict[str, Any]) -> Any:
    """The options record of `profile <what>` from its flags' values (`options_of_values`)."""
    from api.commands.profile import OPTIONS

    return options_of_values(OPTIONS[what], flags)


# Flags that take comma-separated integers.
INT_LIST_FLAGS = ("seq_len", "mbs", "tp", "gemm_rows", "widths", "attention_heads", "attention_seq_lens")


def options_of_values(record: type[Any], flags: dict[str, Any]) -> Any:
    """An options record (a pydantic model) from the flags' values: the model resolved (a preset, a ModelSpec file
    or inline JSON), the comma-separated lists split, unset flags left to the record's defaults; InputError naming
    the flag otherwise."""
    from planner.request import resolve_model
    from planner.specs import ModelSpec

    values = {name: value for name, value in flags.items() if value is not None}
    if "model" in values:
        values["model"] = ModelSpec.model_validate(resolve_model(model_from_flag(values["model"])))
    for name in INT_LIST_FLAGS:
        if name in values:
            values[name] = parse_int_list("--" + name.replace("_", "-"), values[name])
    for name in ("recompute", "ops"):
        if name in values:
            values[name] = tuple(part.strip() if name == "recompute" else part for part in values[name].split(","))
    return record.model_validate(values)


def _measure(options: Any) -> HardwareProfile:
    """The measurement, with Ctrl-C / SIGTERM stopping its workers cleanly."""
    from api.cli.progress import RichProgress
    from api.commands.cancel import with_interrupt
    from api.commands.profile import measure

    return with_interrupt(lambda cancel: measure(options, RichProgress(_console()), cancel))


def _finish_profile(profile: HardwareProfile, options: Any) -> None:
    from api.commands.profile import save

    out = options.out

    profile_id = save(profile, out, options.store, options.name)
    stored = f" and stored as id {profile_id}" if profile_id else ""
    typer.echo(f"profile written to {out}{stored}; plan with it: --profile {profile_id or out}")


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
    try:
        options = options_of("compute", dict(locals()))
        profile = _measure(options)
    except ValueError as exc:
        raise bad_input(exc) from None
    _console().print(layer_table(profile))
    _finish_profile(profile, options)


@profile_app.command("comm")
def profile_comm(
    out: ProfileOutOption,
    nproc: Annotated[int, typer.Option("--nproc", help="Processes (GPUs) per node.")] = 2,
    nnodes: Annotated[int, typer.Option("--nnodes", help="Nodes; above 1 the per-node commands are printed.")] = 1,
    rdzv_endpoint: Annotated[str | None, typer.Option("--rdzv-endpoint", help="host:port of node 0.")] = None,
    min_bytes: Annotated[int, typer.Option("--min-bytes")] = 1024,
    max_bytes: Annotated[int, typer.Option("--max-bytes")] = 256 * MiB,
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
    flags = dict(locals())
    from api.commands.profile import ProfileRunError, comm_launch, per_node_text, sweep_file

    try:
        options = options_of("comm", flags)
        if options.from_sweep is None and nnodes > 1:
            typer.echo(per_node_text(comm_launch(options)), nl=False)
            typer.echo(f"# then: paraplan profile comm --from-sweep {sweep_file(out)} --out {out}")
            return
        profile = _measure(options)
    except ValueError as exc:
        raise bad_input(exc) from None
    except ProfileRunError as exc:
        raise run_failed(exc) from None
    _console().print(collective_table(profile))
    _finish_profile(profile, options)


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
    max_bytes: Annotated[int, typer.Option("--max-bytes", help="Largest collective message.")] = 256 * MiB,
    store: StoreOption = True,
    name: NameOption = None,
) -> None:
    """Compute and collectives on this node, in one profile. With several processes the layers are also timed as
    they run on them: on tp ranks (each tp degree up to --nproc, tp 1 added) and on every rank busy at once, with
    the optimizer step and the ranks' wait per meeting; plans of several ranks are costed from those."""
    flags = dict(locals())
    from api.commands.profile import ProfileRunError

    try:
        options = options_of("all", flags)
        profile = _measure(options)
    except ValueError as exc:
        raise bad_input(exc) from None
    except ProfileRunError as exc:
        raise run_failed(exc) from None
    _console().print(layer_table(profile))
    _console().print(collective_table(profile))
    _finish_profile(profile, options)


def layer_table(profile: HardwareProfile) -> Table:
    """Per-layer forward / backward medians (ms), saved activations (MiB) and the repeats' spread."""
    table = Table(title=f"layer times on {profile.device_name}", title_justify="left")
    columns = ("layer", "recompute", "timed on", "tp", "mbs", "seq", "fwd ms", "bwd ms", "saved MiB", "spread")
    for column in columns:
        table.add_column(column, justify="left" if column in ("layer", "recompute", "timed on") else "right")
    for m in profile.layers:
        spread = max(m.forward.spread, m.backward.spread)
        flag = " [yellow]unstable[/yellow]" if m.forward.unstable or m.backward.unstable else ""
        table.add_row(
            m.layer, m.recompute if m.layer == "block" else "-", _timed_on(m), str(m.tp), str(m.micro_batch_size),
            str(m.seq_len), f"{m.forward.median_s * 1e3:.3f}", f"{m.backward.median_s * 1e3:.3f}",
            f"{m.saved_bytes / MiB:.2f}", f"{spread:.0%}{flag}",
        )  # fmt: skip
    lines = [_optimizer_line(o) for o in profile.optimizer]
    lines += [
        f"wait per meeting of {w.concurrent_ranks} ranks at mbs {w.micro_batch_size}: {w.wait_s * 1e3:.3f} ms"
        for w in profile.meeting_waits
    ]
    table.caption = "\n".join(lines) or None
    return table


def _timed_on(m: LayerMeasurement) -> str:
    """Where a layer was timed: one device alone (a tp shard there), tp ranks with their collectives, or every
    rank of the node busy at once."""
    if m.tp_collectives:
        return f"{m.tp} tp ranks" + (" (sp)" if m.sequence_parallel else "")
    if m.concurrent_ranks > 1:
        return f"{m.concurrent_ranks} ranks busy"
    return "alone"


def _optimizer_line(o: OptimizerMeasurement) -> str:
    per_param_ns = o.time.median_s / o.num_params * 1e9
    how = f", {o.concurrent_ranks} ranks busy" if o.concurrent_ranks > 1 else ""
    how += ", DTensor shards" if o.sharded else ""
    return f"{o.optimizer} step: {per_param_ns:.2f} ns per parameter ({o.num_params:,} parameters{how})"


def collective_table(profile: HardwareProfile) -> Table:
    """Bus bandwidth (GB/s) of each op at each measured size, one column per op and tier, and the fits below."""
    series = sorted({(m.tier, m.op, m.group_size) for m in profile.collectives})
    sizes = sorted({m.size_bytes for m in profile.collectives})
    busbw = {(m.tier, m.op, m.group_size, m.size_bytes): m for m in profile.collectives}
    table = Table(title="bus bandwidth, GB/s (nccl-tests convention)", title_justify="left")
    table.add_column("size", justify="right")
    for tier, op, n in series:
        table.add_column(f"{op}\n{tier} n={n}", justify="right")
    for size in sizes:
        cells = [_busbw_cell(busbw.get((tier, op, n, size))) for tier, op, n in series]
        table.add_row(binary_size(size), *cells)
    fits = [
        f"{f.op} {f.tier} n={f.group_size}: latency {f.latency_s * 1e6:.1f} us, busbw {f.bandwidth_GBps:.2f} GB/s, "
        f"log-R2 {f.r2:.3f}, max error {f.max_rel_error:.0%}"
        for f in profile.collective_fits
    ]
    table.caption = "\n".join(fits)
    return table


def _busbw_cell(measurement: Any) -> str:
    if measurement is None:
        return "-"
    mark = "*" if measurement.time.unstable else ""
    return f"{measurement.busbw_GBps:.3f}{mark}"
