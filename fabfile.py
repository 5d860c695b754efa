"""Fabric entry point: ``fab --list`` shows the deploy tasks; see block/deploy/tasks.py and docs/deploy.md."""

from block.deploy.tasks import collect, inventory, logs, run, setup, start, status, stop, teardown  # noqa: F401
