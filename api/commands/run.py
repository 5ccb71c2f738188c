"""`python -m api.commands.run RECORD`: run one command from its stored options record (written by
`write_record`), reporting progress as plain lines. A job's supervisor (api/jobs/supervise.py) starts it in the job's
own process, so that cancelling a job stops its whole process group and a job outlives the server; it dies with
its supervisor (executor/lifeline.py).

Exit codes as the CLI's: 0 done, 1 bad input, 3 a run failed, 130 stopped.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

RECORD_FILE = "options.json"
EXIT_OK, EXIT_BAD_INPUT, EXIT_RUN_FAILED, EXIT_STOPPED = 0, 1, 3, 130


def write_record(path: Path, command: str, options: BaseModel) -> Path:
    """The record of `command` with `options`, as the job's process will read it. Only the options given are
    kept (the others are the record's defaults when it is read back)."""
    record = {"command": command, "options": json.loads(options.model_dump_json(exclude_unset=True))}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def argv(path: Path) -> list[str]:
    """The command line that runs the record at `path`."""
    return [sys.executable, "-m", "api.commands.run", str(path)]


def read_record(path: Path) -> tuple[str, BaseModel]:
    record = json.loads(path.read_text())
    command = record["command"]
    return command, _options_type(command).model_validate(record["options"])


def _options_type(command: str) -> type[BaseModel]:
    from api.commands import profile, validate

    if command == "validate":
        return validate.ValidateOptions
    return profile.OPTIONS[command.removeprefix("profile ")]


def _profile(options: Any, progress: Any, cancel: threading.Event) -> None:
    from api.commands.profile import measure, save

    profile_id = save(measure(options, progress, cancel), options.out, options.store, options.name)
    stored = f" and stored as id {profile_id}" if profile_id else ""
    print(f"profile written to {options.out}{stored}", flush=True)


def _validate(options: Any, progress: Any, cancel: threading.Event, command: str) -> None:
    from api.commands.validate import run

    finished = run(options, progress, cancel, command)
    print(json.dumps(finished.figures_json()), flush=True)


def main(path: Path) -> int:
    from api.commands.cancel import with_interrupt
    from api.commands.flags import error_payload
    from api.commands.loop.setup import ValidationStopped
    from api.commands.progress import LineProgress
    from api.errors import error_text
    from executor import lifeline

    lifeline.watch_parent()  # the job's supervisor killed: stop as if it had sent SIGTERM
    command, options = read_record(path)
    body: Callable[[threading.Event], None]
    if command == "validate":
        body = lambda cancel: _validate(options, LineProgress(), cancel, f"python -m api.commands.run {path}")  # noqa: E731
    else:
        body = lambda cancel: _profile(options, LineProgress(), cancel)  # noqa: E731
    try:
        with_interrupt(body)
    except ValidationStopped as exc:
        print(f"stopped: {exc}", flush=True)
        return EXIT_STOPPED
    except ValueError as exc:
        print(error_text(error_payload(exc)), flush=True)
        return EXIT_BAD_INPUT
    except RuntimeError as exc:  # a profiling run failed, or fewer than two plans ran
        print(str(exc), flush=True)
        return EXIT_RUN_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
