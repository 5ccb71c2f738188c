"""`POST /v1/kernel-checks`: a kernel profile (`paraplan profile kernels`) set beside a GPU preset's predictions
(planner/kernel_check.py): each GEMM, fused-attention pass and host-floor pass, measured and predicted, and the
ratio, and the preset's constants beside what the measurements imply for them. Nothing is stored; measuring runs
on the machine that has the GPU, under the CLI."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api.commands.kernels import kernel_check_body
from api.routes.common import body_schema, json_body, json_response
from api.routes.responses import READS_A_BODY, errors
from planner.kernel_check import KernelCheck, check_profile, implied_constants

router = APIRouter(prefix="/kernel-checks", tags=["profiles"])


@router.post(
    "",
    summary="A kernel profile's GEMMs, fused attention and host floor beside a GPU preset's predictions",
    openapi_extra=body_schema("KernelCheckBody"),
    responses=errors(*READS_A_BODY),
)
async def create_kernel_check(request: Request) -> Response:
    profile, gpu = kernel_check_body(await json_body(request))
    checks = await run_in_threadpool(check_profile, profile, gpu)
    constants = [asdict(constant) for constant in implied_constants(checks, gpu)]
    return json_response({"gpu": gpu.name, "device_name": profile.device_name, "dtype": profile.dtype,
                          "checks": [check_view(check) for check in checks], "constants": constants})  # fmt: skip


def check_view(check: KernelCheck) -> dict[str, Any]:
    """One check as JSON: its fields and the ratio measured / predicted; seconds per kernel for the host floor."""
    view: dict[str, Any] = {
        "kind": check.kind, "shape": check.shape, "measured_s": check.measured_s, "predicted_s": check.predicted_s,
        "spread": check.spread, "ratio": check.ratio,
    }  # fmt: skip
    if check.kernels:
        view |= {"kernels": check.kernels, "measured_s_per_kernel": check.measured_s_per_kernel,
                 "predicted_s_per_kernel": check.predicted_s_per_kernel}  # fmt: skip
    else:
        view["flops"] = check.flops
    return view
