"""Throwaway OpenSSH "hosts" on this machine: sshd on loopback ports, or one per network namespace.

For the deploy tests, ``benchmarks/deploy.py``, and for trying ``mode=deploy`` without a cluster.

Each server gets a throwaway host key and accepts one throwaway client key (both made here with ssh-keygen), logs in
the current user only, and runs ``internal-sftp`` (Fabric's put/get). Namespaced hosts sit on a Linux bridge in the
root namespace (10.251.<n>.1/24), each with its own address, so services bound to a host's address are reached by
the others exactly as on a real LAN. Everything is torn down at the end: servers, every process left in a
namespace, the namespaces, the veth pairs and the bridge.

Where the machine cannot do it (no sshd, not root for namespaces, no ``ip``), :func:`why_not` says why and the tests
skip with that reason.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from block.ports import free_port

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
PRIVSEP_DIR = "/run/sshd"  # Debian's sshd refuses to start without it; the service unit makes it, a container may not


def sshd_path() -> Optional[str]:
    for p in SSHD_CANDIDATES:
        if os.access(p, os.X_OK):
            return p
    return shutil.which("sshd")


def why_not(netns: bool = False) -> Optional[str]:
    """None when the servers can run here, else the reason (for pytest.skip)."""
    try:
        import fabric  # noqa: F401
    except ImportError:
        return "Fabric is not installed (pip install -e '.[deploy]')"
    if not sshd_path():
        return "OpenSSH's sshd is not installed (Debian: apt-get install openssh-server; .ci/run does)"
    if not shutil.which("ssh-keygen"):
        return "ssh-keygen is not installed (Debian: openssh-client)"
    if not os.path.isdir(PRIVSEP_DIR) and os.geteuid() != 0:
        return f"sshd needs its privilege separation directory {PRIVSEP_DIR}, and only root can create it"
    if netns:
        if os.geteuid() != 0:
            return "network namespaces need root"
        if not shutil.which("ip"):
            return "iproute2's `ip` is not installed"
        probe = f"blkprobe{os.getpid()}"
        r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if r.returncode != 0:
            return f"cannot create a network namespace here: {r.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "block-test", "-f", str(path)], check=True)


@dataclass
class SshServer:
    name: str
    address: str
    port: int
    proc: subprocess.Popen
    log: Path
    netns: Optional[str] = None


@dataclass
class SshHosts:
    """A set of running sshd servers sharing one throwaway client key (``client_key``)."""

    root: Path
    client_key: Path
    user: str = field(default_factory=getpass.getuser)
    servers: list[SshServer] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    bridge: Optional[str] = None
    home: Optional[Path] = None  # $HOME of the ssh sessions (sshd's SetEnv), so a test can aim at a throwaway one

    def _config(self, name: str, address: str, port: int) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        _keygen(d / "host_key")
        cfg = d / "sshd_config"
        cfg.write_text("\n".join([
            f"Port {port}", f"ListenAddress {address}", f"HostKey {d / 'host_key'}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}", f"PidFile {d / 'sshd.pid'}",
            f"AllowUsers {self.user}", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no",
            "Subsystem sftp internal-sftp", "MaxStartups 100:30:200", "MaxSessions 100", "LogLevel VERBOSE",
            *([f'SetEnv HOME="{self.home}"'] if self.home else []), "",
        ]))
        return cfg

    def _spawn(self, name: str, address: str, port: int, netns: Optional[str]) -> SshServer:
        if not os.path.isdir(PRIVSEP_DIR) and os.geteuid() == 0:
            os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
        cfg = self._config(name, address, port)
        log = self.root / name / "sshd.log"
        cmd = [sshd_path(), "-D", "-e", "-f", str(cfg)]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        srv = SshServer(name, address, port, proc, log, netns)
        self.servers.append(srv)
        return srv

    def wait_ready(self, timeout_s: float = 15.0) -> None:
        """Until every server accepts TCP and says its SSH banner (namespaced ones via ``ip netns exec``)."""
        deadline = time.monotonic() + timeout_s
        for srv in self.servers:
            while True:
                if srv.proc.poll() is not None:
                    raise RuntimeError(f"sshd {srv.name} exited {srv.proc.returncode}: {srv.log.read_text()[-2000:]}")
                try:
                    with socket.create_connection((srv.address, srv.port), timeout=1.0) as s:
                        if s.recv(64).startswith(b"SSH-"):
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd {srv.name} not ready at {srv.address}:{srv.port}: "
                                       f"{srv.log.read_text()[-2000:]}")
                time.sleep(0.1)

    def close(self) -> None:
        for srv in self.servers:
            if srv.proc.poll() is None:
                try:
                    os.killpg(srv.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    srv.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(srv.proc.pid, signal.SIGKILL)
        for ns in self.netns:  # whatever the tests left running inside a namespace dies with it
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if self.bridge:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def _client(root: Path) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    key = root / "client_key"
    _keygen(key)
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    os.chmod(root / "authorized_keys", 0o600)
    return root, key


def loopback_hosts(root: Path, count: int = 1, home: Optional[Path] = None) -> SshHosts:
    """``count`` sshd servers on 127.0.0.1, each on its own free port; ``home``: the sessions' ``$HOME``."""
    root, key = _client(Path(root))
    hosts = SshHosts(root, key, home=Path(home) if home else None)
    try:
        for i in range(count):
            hosts._spawn(f"host{i}", "127.0.0.1", free_port(), None)
        hosts.wait_ready()
    except BaseException:
        hosts.close()
        raise
    return hosts


def netns_hosts(root: Path, count: int = 3) -> SshHosts:
    """``count`` hosts, each a network namespace with its own address on a bridge, each running sshd on :22."""
    root, key = _client(Path(root))
    tag = f"{os.getpid() % 10000}"
    subnet = 251 if os.getpid() % 2 else 252
    hosts = SshHosts(root, key, bridge=f"blkbr{tag}")

    def ip(*args: str, ns: Optional[str] = None) -> None:
        cmd = ["ip", *(["-n", ns] if ns else []), *args]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")

    try:
        ip("link", "add", hosts.bridge, "type", "bridge")
        ip("addr", "add", f"10.{subnet}.{int(tag) % 250}.1/24", "dev", hosts.bridge)
        ip("link", "set", hosts.bridge, "up")
        for i in range(count):
            ns = f"blk{tag}h{i}"
            a, b = f"blk{tag}a{i}", f"blk{tag}b{i}"
            ip("netns", "add", ns)
            hosts.netns.append(ns)
            ip("link", "add", a, "type", "veth", "peer", "name", b)
            ip("link", "set", a, "master", hosts.bridge)
            ip("link", "set", a, "up")
            ip("link", "set", b, "netns", ns)
            addr = f"10.{subnet}.{int(tag) % 250}.{11 + i}"
            ip("addr", "add", f"{addr}/24", "dev", b, ns=ns)
            ip("link", "set", b, "up", ns=ns)
            ip("link", "set", "lo", "up", ns=ns)
            hosts._spawn(f"node{i}", addr, 22, ns)
        hosts.wait_ready()
    except BaseException:
        hosts.close()
        raise
    return hosts
