"""Fabric entry point: ``fab --list`` shows the deploy tasks; see experiments/fab_tasks.py and docs/deploy.md."""

from experiments.fab_tasks import collect, inventory, logs, run, setup, start, status, stop, teardown  # noqa: F401
