"""The launcher's structured config, stored as ``hydra/launcher: block_ray`` (conf/hydra/launcher/ray_*.yaml
build on it). Typed, so a misspelt key fails when Hydra composes the sweep, before anything is submitted."""

# no `from __future__ import annotations` in this package: Hydra's plugin scan runs each module outside sys.modules,
# where dataclasses cannot resolve string annotations
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class BlockRayLauncherConf:
    _target_: str = "hydra_plugins.block_ray_launcher.launcher.RayClusterLauncher"
    # null: start a private Ray on this machine; "auto": the cluster started on this host (`ray start --head`);
    # "<head ip>:<port>" (the GCS address `ray start --head` prints) or "ray://<head>:10001" (Ray client)
    address: Optional[str] = None
    # more keyword arguments of ray.init(); only for a private Ray (num_cpus, object_store_memory, ...): Ray
    # refuses resource arguments when it joins an existing cluster
    init: Dict[str, Any] = field(default_factory=dict)
    # options of ray.remote() for every run: num_cpus, memory, resources, max_calls, scheduling_strategy, ...
    remote: Dict[str, Any] = field(default_factory=dict)
    # "same_path": workers run in the driver's working directory (this repository, at the same path on every node)
    # and write the sweep directory there; it must be on a file system all nodes share (NFS, ...), since resume
    # and the progress bar read summary.json files on the driver
    workdir: str = "same_path"


ConfigStore.instance().store(group="hydra/launcher", name="block_ray", node=BlockRayLauncherConf,
                             provider="block_ray_launcher")
