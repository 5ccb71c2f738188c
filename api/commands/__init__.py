"""The commands layer: each command (estimate, plan, profile, train, validate) as a typed options record and the
operation that runs it. The CLI (api/cli/) and the REST service (api/routes/, its jobs through
api/commands/run.py) call these, nothing else; nothing here draws (progress goes through
api/commands/progress.py) or imports the CLI."""
