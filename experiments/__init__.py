"""Hydra entry points and the wiring from configs to a mode: see DESIGN.md for what lives here.

Importing the package registers the ``${run_dirname:}`` resolver that conf/config.yaml names run directories with
(``experiments.rundir``), so any process that resolves a run's Hydra config -- the entry points, a launcher's worker,
a test composing the config -- has it.
"""

from experiments import rundir as _rundir  # noqa: F401
