"""The REST service's routers (mounted by api/app.py): health, catalog, estimates, plans, profiles, jobs."""
