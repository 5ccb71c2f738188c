"""What every profiling worker run under torchrun does at its edges (profiler/collectives.py, profiler/tp_layers.py):
write rank 0's result atomically, leave the process group, record an exception in torchrun's error file, and die
with torchrun's agent (executor/lifeline.py)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from executor import lifeline


def write_json_atomically(path: Path, data: object) -> None:
    """Write through a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1))
    os.replace(partial, path)


def leave() -> NoReturn:
    """Wait for every rank, close the process group, and exit without interpreter finalization: with torch 2.13 +
    gloo a gloo worker thread can still be releasing a finished collective's tensors when Python finalizes, and
    the rank then aborts (SIGABRT) after all its work is done (tests/distributed/parity_worker.py has the
    details). Everything is written and flushed first."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_recorded(run: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None) -> None:
    """Run a worker's body; an exception is recorded in the rank's torchrun error file (and so in its report). If
    torchrun's agent dies meanwhile, the worker ends (SIGTERM's default: at once) instead of measuring on."""
    from torch.distributed.elastic.multiprocessing.errors import record

    lifeline.watch_parent()
    record(run)(argv)
