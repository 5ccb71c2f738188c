"""`python -m api.cli ...`: the `paraplan` command."""

from api.cli import main

main()
