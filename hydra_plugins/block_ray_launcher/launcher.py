"""``RayClusterLauncher``: Hydra's Launcher interface; the work is in ``_core`` (imported on launch only, so that
Hydra's plugin discovery, which imports every module under ``hydra_plugins``, never imports Ray)."""

from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


class RayClusterLauncher(Launcher):
    """Runs every job of a sweep as one Ray task (``ray.remote(**remote)``) and waits for all of them."""

    def __init__(self, address: Optional[str] = None, init: Any = None, remote: Any = None,
                 workdir: str = "same_path") -> None:
        if workdir != "same_path":
            raise ValueError(f"hydra.launcher.workdir={workdir!r}: only 'same_path' is supported")
        self.address = address
        self.init = dict(_plain(init) or {})
        self.remote = dict(_plain(remote) or {})
        self.workdir = workdir
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            import ray  # noqa: F401
        except ImportError as err:
            raise ImportError(f"hydra/launcher=ray_cluster needs Ray: pip install -e '.[cluster]' ({err})") from None
        from hydra_plugins.block_ray_launcher import _core

        return _core.launch(self, job_overrides, initial_job_idx)
