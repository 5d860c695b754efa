"""Deployment onto real hosts with Fabric.

- ``inventory``: a CloudLab manifest or a pssh-style hosts file -> a Hydra cluster config with ``hosts``;
- ``hostctl``: the host-side half, run over ssh: starts, stops and reports a host's services as detached processes;
- ``fleet``: ssh connections to every host and parallel work over them, with per-host errors;
- ``ops``: the steps (setup, start, stop, status, run, collect, teardown) over a fleet;
- ``tasks``: the ``fab`` tasks (``fabfile.py`` at the root re-exports them).

``mode=deploy`` (``experiments/deploy.py``) drives the same steps from a run's config.
"""
