"""Defaults that the CLI's options spell and the commands' records take alike, here once, in a module the CLI can
import at start-up (nothing but constants: `paraplan --help` imports no planner, profiler or pydantic)."""

# profiler.collectives.OPS, spelled out so that `paraplan --help` need not import the profiler: what a collective
# sweep measures unless told otherwise (`profile comm --ops`, `profile all`).
ALL_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv", "fsdp_all_gather",
                   "fsdp_reduce_scatter")  # fmt: skip

# A small Llama (3.3M parameters) whose blocks take milliseconds on one CPU core: what `validate` runs by default.
VALIDATION_MODEL = (
    '{"name": "llama3-8b", "num_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "num_kv_heads": 2, '
    '"ffn_hidden_size": 704, "vocab_size": 256}'
)

# Steps each plan trains by default: 16 steady ones after the 4 warm-up steps. A plan's time is the median of its
# steady steps, whose p10-p90 spread reached 30% on launch-bound GPU plans and on this 2-core CPU
# (benchmarks/results/2026-12-04-*.md): a coefficient of variation near 12%, so 16 steps put the median's standard
# error near 1.25 x 12% / 4 = 4%, against 5% with the 8 of the former default of 12 steps. More passes or steps
# narrow it further (the CPU targets took 4 runs of 30 steps a plan).
DEFAULT_STEPS = 20

# The technique entries `validate` can add to the search space's plans (api/commands/loop/techniques.py), each where
# this machine can run it: context parallelism, fp16 with loss scaling, CPU offload, expert parallelism. Asked for
# (`--techniques all`), not by default: on this 2-core CPU they add four runs and two layer profiles (fp16's and
# the mixture of experts'), which lengthened a 3-plan validation by more than half (docs/profiling.md).
ALL_TECHNIQUES = ("cp", "fp16", "offload", "ep")
DEFAULT_TECHNIQUES: tuple[str, ...] = ()
