"""Hydra launcher that runs each run of a sweep as a Ray task on a Ray cluster (``hydra/launcher=ray_cluster``).

Why our own and not ``hydra-ray-launcher``: its 1.2.2 (the current release) requires ``cloudpickle<3``, while
joblib >= 1.6 (hydra-joblib-launcher, the project's one-machine launcher) requires ``cloudpickle>=3``, so pip cannot
install both (ResolutionImpossible), and installing it alone downgrades cloudpickle under joblib. This plugin needs
only ``ray`` (2.x, no extras): Ray carries its own cloudpickle.

Modules: ``config`` (the structured config Hydra composes), ``launcher`` (the Launcher class, imports no Ray so
Hydra's plugin scan stays fast), ``_core`` (driver and task side), ``_local_cluster`` (head + workers on loopback
for tests, benchmarks and a laptop). Hydra's scan imports every module of a plugin package at every run's start
except those named with a leading underscore: ``_local_cluster``'s imports cost each run 4 ms before it had one.
"""
