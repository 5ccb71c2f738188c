"""paraplan's front doors: the `paraplan` command (api.cli) and, later, the REST service."""
