"""`profile kernels`: the kernel sweep's options (a typed record), its checks (no torch), the measurement with a
progress bar, the file it is kept in, and the GPU preset it is compared with (planner/kernel_check.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from api.commands.flags import flag_name
from api.commands.progress import Progress
from api.errors import InputError
from planner.errors import UnknownPresetError
from planner.specs import GpuSpec, ModelSpec
from planner.specs.kernels import KERNEL_PROFILE_SCHEMA_VERSION, KernelProfile
from profiler.kernels import KernelSweep, KernelSweepError


class KernelOptions(BaseModel):
    """`profile kernels`: what to measure (None: the device's default grid) and the preset to compare with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out: Path
    model: ModelSpec
    device: str = "cpu"
    dtype: str | None = None  # None: bf16 on cuda, fp32 on the CPU; checked by the sweep, which names the flag
    gemm_rows: tuple[int, ...] | None = None
    widths: tuple[int, ...] | None = None
    attention_heads: tuple[int, ...] | None = None
    attention_seq_lens: tuple[int, ...] | None = None
    head_dim: int = 128
    warmup: int = 3
    repeats: int = 10


def kernel_sweep(options: KernelOptions) -> KernelSweep:
    """The KernelSweep the options describe, or KernelSweepError naming the bad flag's field."""
    sweep = KernelSweep.for_device(
        options.model, options.device, dtype=options.dtype or ("bf16" if options.device == "cuda" else "fp32"),
        gemm_rows=options.gemm_rows, widths=options.widths, attention_heads=options.attention_heads,
        attention_seq_lens=options.attention_seq_lens, head_dim=options.head_dim, warmup=options.warmup,
        repeats=options.repeats,
    )  # fmt: skip
    problems = sweep.violations()
    if problems:
        message = "; ".join(f"{flag_name(name)}: {why}" for name, why in problems)
        raise KernelSweepError(flag_name(problems[0][0]), message)
    return sweep


def measure_kernels(sweep: KernelSweep, progress: Progress, cancel: threading.Event | None = None) -> KernelProfile:
    """Measure `sweep` here, one progress tick per kernel shape; a stop (`cancel`) is seen between shapes."""
    from api.commands.profile import ProfileRunError
    from profiler.kernels import profile_kernels

    with progress.task("kernels", total=sweep.points, what="starting") as update:

        def on_progress(done: int, total: int, what: str) -> None:
            if cancel is not None and cancel.is_set():
                raise ProfileRunError("the kernel sweep was stopped before it finished")
            update(done, total, what)

        return profile_kernels(sweep, on_progress=on_progress)


def check_writable(out: Path, flag: str = "--out") -> None:
    """Refuse, naming `flag`, a file that cannot be written, before a measurement would be lost to it."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError.at(flag, f"cannot create the folder of {out}: {exc.strerror or exc}") from None
    if out.is_dir():
        raise InputError.at(flag, f"{out} is a folder; give a file name")


def save_kernel_profile(profile: KernelProfile, out: Path, flag: str = "--out") -> None:
    check_writable(out, flag)
    try:
        out.write_text(profile.model_dump_json(indent=2) + "\n")
    except OSError as exc:
        raise InputError.at(flag, f"cannot write {out}: {exc.strerror or exc}") from None


def read_kernel_profile(path: Path, flag: str = "--from") -> KernelProfile:
    """A kernel profile file; InputError naming `flag` when it is missing, not JSON or not a kernel profile
    (`kernel_profile_of`)."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InputError.at(flag, f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError.at(flag, f"{path} is not JSON ({exc.msg}, line {exc.lineno})") from None
    return kernel_profile_of(data, flag, f"{path}: ")


def kernel_profile_of(data: object, field: str, where: str = "") -> KernelProfile:
    """`data` as a KernelProfile; InputError naming `field` when it is of another schema version or not a kernel
    profile (the first field at fault named)."""
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != KERNEL_PROFILE_SCHEMA_VERSION:
        raise InputError.at(field, f"{where}not a kernel profile of schema version {KERNEL_PROFILE_SCHEMA_VERSION} "
                                   f"(its schema_version: {version!r})")  # fmt: skip
    try:
        return KernelProfile.model_validate(data, strict=True)  # JSON types as they are: no 0 for false
    except ValidationError as exc:
        first = exc.errors()[0]
        at = ".".join(str(part) for part in first["loc"])
        raise InputError.at(field, f"{where}{at}: {first['msg']}") from None


class KernelCheckBody(BaseModel):
    """`POST /v1/kernel-checks`: a kernel profile and, optionally, the GPU preset to set it beside (default: the
    one the profile's device is named after)."""

    model_config = ConfigDict(title="KernelCheckBody", extra="forbid")

    profile: KernelProfile
    gpu: str | None = None


def kernel_check_body(body: dict) -> tuple[KernelProfile, GpuSpec]:
    """The profile and preset of a kernel-check body; InputError naming the field at fault."""
    unknown = sorted(set(body) - set(KernelCheckBody.model_fields))
    if unknown:
        raise InputError.at(unknown[0], "not a field of a kernel check (profile, gpu)")
    if "profile" not in body:
        raise InputError.at("profile", "required: a kernel profile (`paraplan profile kernels --out`)")
    gpu = body.get("gpu")
    if gpu is not None and not isinstance(gpu, str):
        raise InputError.at("gpu", f"must be a GPU preset's name, got {gpu!r}")
    profile = kernel_profile_of(body["profile"], "profile")
    return profile, comparison_gpu(gpu, profile, flag="gpu")


def comparison_gpu(gpu: str | None, profile: KernelProfile, flag: str = "--gpu") -> GpuSpec:
    """The preset to set beside `profile`: `gpu` as named, else the one the measured device's name is (the CPU
    preset for a CPU); InputError naming `flag` where neither gives one."""
    from planner.presets import gpu_preset, gpu_preset_for_device

    name = gpu or ("cpu" if profile.device_kind == "cpu" else gpu_preset_for_device(profile.device_name))
    if name is None:
        raise InputError.at(flag, f"no GPU preset is named after {profile.device_name!r}: name one to compare with")
    try:
        return gpu_preset(name)
    except UnknownPresetError as exc:
        raise InputError.at(flag, str(exc)) from None
