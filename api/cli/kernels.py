"""`paraplan profile kernels`: measure this device's GEMMs, fused attention and host floor (or read a kernel profile
measured before) and print them beside a GPU preset's predictions (planner/kernel_check.py)."""

from __future__ import annotations

from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from api.cli.app import bad_input, profile_app, run_failed
from api.cli.app import console as _console
from api.cli.profile import ProfileModelOption, RepeatsOption, SweepDeviceOption, WarmupRunsOption

if TYPE_CHECKING:
    from planner.kernel_check import ImpliedConstant, KernelCheck
    from planner.specs import GpuSpec
    from planner.specs.kernels import KernelProfile

IntListOption = Annotated[str | None, typer.Option(help="Comma-separated; default: the device's grid.")]


@profile_app.command("kernels")
def profile_kernels(
    out: Annotated[Path | None, typer.Option("--out", help="Where to write the kernel profile (JSON).")] = None,
    model: ProfileModelOption = "llama3.2-1b",
    device: SweepDeviceOption = "cpu",
    dtype: Annotated[str | None, typer.Option(help="fp32 (CPU); bf16 (cuda's default), fp16 or fp32.")] = None,
    gemm_rows: IntListOption = None,
    widths: IntListOption = None,
    attention_heads: IntListOption = None,
    attention_seq_lens: IntListOption = None,
    head_dim: Annotated[int, typer.Option(help="Attention head size.")] = 128,
    warmup: WarmupRunsOption = 3,
    repeats: RepeatsOption = 10,
    gpu: Annotated[str | None, typer.Option(help="GPU preset to compare with (default: the device's own).")] = None,
    from_file: Annotated[
        Path | None, typer.Option("--from", help="Compare a kernel profile measured before instead of measuring.")
    ] = None,
) -> None:
    """Measure GEMMs (rows x width, a transformer's linear shapes), causal fused attention and the executor's host
    time per kernel here, and print each beside what a GPU preset predicts."""
    flags = {name: value for name, value in locals().items() if name not in ("gpu", "from_file")}
    from api.commands.kernels import comparison_gpu, read_kernel_profile, save_kernel_profile
    from api.commands.profile import ProfileRunError

    try:
        if from_file is not None:
            profile = read_kernel_profile(from_file)
        else:
            profile = _measure(flags)
            save_kernel_profile(profile, flags["out"])
            typer.echo(f"kernel profile written to {flags['out']}")
        preset = comparison_gpu(gpu, profile)
    except ValueError as exc:
        raise bad_input(exc) from None
    except ProfileRunError as exc:
        raise run_failed(exc) from None
    print_checks(profile, preset)


def _measure(flags: dict) -> KernelProfile:
    from api.cli.profile import options_of_values
    from api.cli.progress import RichProgress
    from api.commands.cancel import with_interrupt
    from api.commands.kernels import KernelOptions, check_writable, kernel_sweep, measure_kernels
    from api.errors import InputError

    if flags["out"] is None:
        raise InputError.at("--out", "give a file to write the kernel profile to (or --from one measured before)")
    options = options_of_values(KernelOptions, flags)
    sweep = kernel_sweep(options)
    check_writable(options.out)
    return with_interrupt(lambda cancel: measure_kernels(sweep, RichProgress(_console()), cancel))


def print_checks(profile: KernelProfile, gpu: GpuSpec) -> None:
    from planner.kernel_check import check_profile, implied_constants

    checks = check_profile(profile, gpu)
    peak = gpu.peak_tflops.get(profile.dtype) or 0.0
    console = _console()
    console.print(f"{profile.device_name} ({profile.dtype}, torch {profile.torch_version}) against preset "
                  f"{gpu.name}: dense peak {peak:g} TFLOP/s", highlight=False)  # fmt: skip
    for title, kinds in (("GEMMs", ("gemm",)), ("causal fused attention", ("attention forward", "attention backward"))):
        rows = [check for check in checks if check.kind in kinds]
        if rows:
            console.print(flops_table(title, rows, peak * 1e12))
    floor = [check for check in checks if check.kind.startswith("host floor")]
    if floor:
        console.print(host_floor_table(floor))
    console.print(constants_table(implied_constants(checks, gpu), gpu.name))


def flops_table(title: str, checks: list[KernelCheck], peak_flops_per_s: float) -> Table:
    """Measured and predicted time and share of the dense peak per shape, and their ratio; the median below."""
    attention = checks[0].kind.startswith("attention")
    table = Table(title=f"{title}: measured vs predicted", title_justify="left")
    columns = ("pass" if attention else "", "b x s x heads x d" if attention else "rows x inner x cols",
               "ms", "spread", "% peak", "predicted ms", "predicted % peak", "measured / predicted")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in columns[:2] else "right")
    for check in checks:
        table.add_row(
            check.kind.removeprefix("attention ") if attention else "gemm", check.shape,
            f"{check.measured_s * 1e3:.3f}", f"{check.spread:.0%}", _percent(check, peak_flops_per_s, check.measured_s),
            f"{check.predicted_s * 1e3:.3f}", _percent(check, peak_flops_per_s, check.predicted_s),
            f"{check.ratio:.2f}",
        )  # fmt: skip
    ratios = [check.ratio for check in checks]
    table.caption = f"measured / predicted: median {median(ratios):.2f}, {min(ratios):.2f} to {max(ratios):.2f}"
    return table


def _percent(check: KernelCheck, peak_flops_per_s: float, seconds: float) -> str:
    """The share of the peak, or "-" where there is no peak or the time is 0 (below a clock's resolution)."""
    return f"{check.efficiency(peak_flops_per_s, seconds):.0%}" if peak_flops_per_s and seconds > 0 else "-"


def constants_table(constants: list[ImpliedConstant], preset: str) -> Table:
    """The preset's constants beside what the measurements imply (planner/kernel_check.py `implied_constants`)."""
    table = Table(title=f"{preset}'s constants against this device's", title_justify="left")
    for column in ("constant", preset, "measured", "from"):
        table.add_column(column, justify="right" if column in (preset, "measured") else "left")
    for constant in constants:
        values = (constant.preset, constant.measured)
        per_kernel = constant.name.startswith("host")
        shown = (f"{value * 1e6:.1f} us" if per_kernel else f"{value:.3f}" for value in values)
        table.add_row(constant.name, *shown, constant.basis)
    return table


def host_floor_table(checks: list[KernelCheck]) -> Table:
    """The narrowed block's passes: measured and predicted, over the kernels the cost model counts."""
    table = Table(title="host floor: the executor's block at a width no kernel waits on", title_justify="left")
    columns = ("pass", "heads x seq", "kernels", "ms", "spread", "us / kernel", "predicted ms",
               "predicted us / kernel", "measured / predicted")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in columns[:2] else "right")
    for check in checks:
        table.add_row(
            check.kind.removeprefix("host floor "), check.shape, str(check.kernels), f"{check.measured_s * 1e3:.3f}",
            f"{check.spread:.0%}", f"{check.measured_s_per_kernel * 1e6:.1f}", f"{check.predicted_s * 1e3:.3f}",
            f"{check.predicted_s_per_kernel * 1e6:.1f}", f"{check.ratio:.2f}",
        )  # fmt: skip
    return table
