"""The REST service's jobs: the runner (runner.py: queue, start, watch, cancel, reconcile after a restart), each
job's supervisor process (supervise.py), and the kinds of job: train.py (torchrun directly), profile.py and
validate.py (a command of api/commands/ run from its stored options record by api/commands/run.py)."""
