"""`paraplan serve`: the REST API under uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from api.cli.app import EXIT_BAD_INPUT, app, error_payload, print_error


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
    search_workers: Annotated[
        int | None,
        typer.Option(
            "--search-workers",
            min=0,
            help="Processes running plan searches side by side; 0: in the server process "
            "($PARAPLAN_SEARCH_WORKERS; default: one per core).",
        ),
    ] = None,
) -> None:
    """Serve the REST API (OpenAPI docs at /docs). Endpoints that start processes need PARAPLAN_API_TOKEN."""
    import logging

    import uvicorn

    from api.app import create_app
    from api.jobs import folder_lock
    from api.settings import Settings

    try:
        settings = Settings.from_env(data_dir=data_dir, max_concurrent_jobs=max_jobs, search_workers=search_workers)
        # Held until this process exits: a second server on the folder is refused here, naming this one's pid.
        folder_lock.acquire(settings.data_dir)
        application = create_app(settings)
    except ValueError as exc:
        print_error(error_payload(exc), as_json=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = "on" if settings.api_token else "off (profiles and jobs are disabled; set PARAPLAN_API_TOKEN)"
    typer.echo(f"paraplan serving http://{host}:{port} (data: {settings.data_dir}; token: {token})", err=True)
    uvicorn.run(application, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
