"""A Ray cluster of several nodes on this machine, on loopback: one ``ray start --head`` and ``ray start
--address=...`` per further node, each its own process tree, exactly as on real hosts.

For tests, benchmarks and a laptop check of ``hydra/launcher=ray_cluster``. Small by default (1 CPU per node, a
100 MB object store, no dashboard, no usage stats). ``stop()`` ends only the processes this object started (each
node runs ``ray start --block`` in its own process group), never ``ray stop``, which would stop every Ray node of
the user on the machine. Its temp dir is short on purpose: Ray's Unix socket paths (temp dir +
``session_<date>_<pid>/sockets/plasma_store``) must stay under the 107-byte AF_UNIX limit, which a pytest
``tmp_path`` exceeds.

Ray listens on all interfaces whatever the node address, so the cluster requires Ray's token authentication with a
fresh token of its own (in its temp dir): nothing else can use it, and it does not depend on, or write,
``~/.ray/auth_token`` (which a private ``ray.init()`` creates, and which ``ray start`` would otherwise pick up).
Processes that connect (a sweep with ``hydra/launcher=ray_cluster``) need ``driver_env()``.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from block.ports import free_port

WAIT_FOR_NODES = r"""
import json, sys, time
import ray
address, want, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
ray.init(address=address, _node_ip_address=address.rpartition(":")[0], logging_level="ERROR", log_to_driver=False)
while True:
    alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    if len(alive) >= want or time.monotonic() > deadline:
        break
    time.sleep(0.2)
print(json.dumps(alive))
"""


# Ray rewrites 127.0.0.1 and localhost to the machine's outward address (so that other hosts can reach a node) and
# then talks to itself over that interface; another address of the loopback range keeps a test cluster on loopback.
LOOPBACK = "127.0.0.2"


def _ray_cli() -> List[str]:
    """``ray`` of this interpreter's installation (not whichever is first on PATH)."""
    exe = Path(sys.executable).with_name("ray")
    return [str(exe)] if exe.is_file() else [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]


@dataclass
class LocalRayCluster:
    """``with LocalRayCluster(num_nodes=2) as c: ... c.address ... c.node_ids``."""

    num_nodes: int = 2
    cpus_per_node: int = 1
    object_store_bytes: int = 100 * 1024 ** 2
    host: str = LOOPBACK
    log_dir: Optional[Path] = None  # where each node's `ray start` output goes (default: the temp dir)
    start_timeout_s: float = 120.0
    address: str = ""
    node_ids: List[str] = field(default_factory=list)
    temp_dir: Optional[Path] = None
    _procs: List[subprocess.Popen] = field(default_factory=list)
    _logs: List[Path] = field(default_factory=list)

    def _node(self, name: str, args: List[str], env: dict) -> None:
        log = Path(self.log_dir or self.temp_dir) / f"{name}.log"
        self._logs.append(log)
        with open(log, "wb") as out:
            self._procs.append(subprocess.Popen(
                [*_ray_cli(), "start", "--block", f"--node-ip-address={self.host}",
                 f"--num-cpus={self.cpus_per_node}", f"--object-store-memory={self.object_store_bytes}",
                 "--disable-usage-stats", *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True))

    def driver_env(self, base: Optional[dict] = None) -> dict:
        """The environment of a process that connects to this cluster: its token, no other cluster's address."""
        env = dict(os.environ if base is None else base)
        for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
            env.pop(k, None)
        env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=str(Path(self.temp_dir or "") / "auth_token"))
        return env

    def start(self) -> "LocalRayCluster":
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        token = self.temp_dir / "auth_token"
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))  # 256 bits, as Ray's own generator
        env = self.driver_env()
        port = free_port(self.host)
        self.address = f"{self.host}:{port}"
        try:
            self._node("head", ["--head", f"--port={port}", "--include-dashboard=false",
                                f"--temp-dir={self.temp_dir}"], env)
            for i in range(1, self.num_nodes):
                self._node(f"worker{i}", [f"--address={self.address}"], env)
            self.node_ids = self._wait_for_nodes()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_nodes(self) -> List[str]:
        """Block until every node has joined (asks the head's GCS; no sleep-and-hope)."""
        p = subprocess.run([sys.executable, "-c", WAIT_FOR_NODES, self.address, str(self.num_nodes),
                            str(self.start_timeout_s)], capture_output=True, text=True,
                           timeout=self.start_timeout_s + 60, env=self.driver_env())
        ids = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else []
        if len(ids) < self.num_nodes:
            raise RuntimeError(f"Ray cluster at {self.address}: {len(ids)}/{self.num_nodes} nodes joined\n"
                               f"{p.stderr[-2000:]}\n{self.logs()[-4000:]}")
        return ids

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in self._logs if p.is_file())

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM each node's process group (raylet, GCS, agents; workers exit with their raylet), SIGKILL what
        is left after ``timeout_s`` (``ray start --block`` itself takes ~30 s to exit on SIGTERM, which a test
        cluster need not wait for); then remove the temp dir. Safe to call twice."""
        for p in reversed(self._procs):
            _signal_group(p, signal.SIGTERM)
        for p in reversed(self._procs):
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(p, signal.SIGKILL)  # the group may outlive its leader: end the raylet's children too
            p.wait()
        self._procs.clear()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalRayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # start_new_session: the group id is the leader's pid, ours alone
    except (ProcessLookupError, PermissionError):
        pass
