"""`paraplan catalog models|gpus`: the presets, as tables or JSON."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from api.cli.app import catalog_app
from api.cli.app import console as _console
from api.cli.report import format_count
from planner.units import GiB

if TYPE_CHECKING:
    from planner.specs import GpuSpec


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
            _bf16_peak(gpu),
            f"{gpu.hbm_GBps:g}",
            f"{gpu.intra_node.bandwidth_GBps:g} ({gpu.intra_node.name})",
            f"{gpu.inter_node.bandwidth_GBps:g} ({gpu.inter_node.name})",
        )
    _console().print(table)


def _bf16_peak(gpu: GpuSpec) -> str:
    """The bf16 peak; a GPU without bf16 (V100) shows its fp16 peak instead, which is what it trains at."""
    if gpu.supports("bf16"):
        return f"{gpu.peak_tflops['bf16']:g}"
    return f"none (fp16 {gpu.peak_tflops['fp16']:g})"
