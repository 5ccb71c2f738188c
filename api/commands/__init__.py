"""The commands layer: each command (estimate, plan, profile, train, validate) as a typed options record and the
operation that runs it. The CLI (api/cli/) and the REST service (api/routes/, its jobs through
api/commands/run.py) call these, nothing else; nothing here draws (progress goes through
api/commands/progress.py) or imports the CLI.

`loop/` is the closed loop behind `validate`: it composes the profile and train commands, so it sits inside this
layer, below `validate.py` and `run.py` and above the commands it runs (the import contracts in pyproject.toml
keep it acyclic)."""
