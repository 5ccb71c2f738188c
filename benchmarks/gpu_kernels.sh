#!/usr/bin/env bash
# Measure one CUDA GPU's GEMMs, causal fused attention and the executor's host floor (`paraplan profile kernels`,
# the device's default grid, bf16) and compare them with the GPU presets: the device's own, then each preset named
# after it. Writes OUT/kernels.json and OUT/compare-PRESET.txt, one per preset.
#
#   benchmarks/gpu_kernels.sh OUT [PRESET ...]      e.g. benchmarks/gpu_kernels.sh $OUT h100-sxm h200
#
# On a lent device machine (python3 with torch, typer, rich and numpy, but no pydantic), carry pydantic's wheels:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# and start the command with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
# About a minute on an H100, CUDA's start included. DEVICE=cpu runs the same steps on this machine's CPU (fp32, its
# small grid): a check of the script without a GPU.
set -uo pipefail
out=${1:?usage: gpu_kernels.sh OUT [PRESET ...]}
shift
mkdir -p "$out"
paraplan=(python3 -c "import sys; sys.argv[0] = 'paraplan'; from api.cli import main; main()")
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"

device=${DEVICE:-cuda}
dtype=$([[ $device == cuda ]] && echo bf16 || echo fp32)

if [[ $device == cuda ]]; then
    nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,memory.total --format=csv | tee "$out/device.txt"
fi
"${paraplan[@]}" profile kernels --device "$device" --dtype "$dtype" --out "$out/kernels.json" | tee "$out/compare-own.txt"
for preset in "$@"; do
    "${paraplan[@]}" profile kernels --from "$out/kernels.json" --gpu "$preset" > "$out/compare-$preset.txt"
done
