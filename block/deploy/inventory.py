"""Inventory: which hosts a deployment runs on, and what runs where.

Block's authors turn a CloudLab ``manifest.xml`` into a pssh-style hosts file (``user@hostname`` per line, the first
host runs the scheduler and the benchmark) plus the experiment-LAN IPs. We keep the same information, but as a Hydra
cluster config (``conf/cluster/<name>.yaml``) so a deploy run is composed like any other run
(``cluster=<name> mode=deploy``): the usual ``name`` and ``num_instances`` keys plus a ``hosts`` list, one entry per
machine (:class:`Host`). Everything else in ``block.deploy`` reads hosts through :func:`hosts_from_config`, so the
checks live here, once, and their messages name the host, line or key at fault.

Two sources are understood:

* a CloudLab / GENI RSpec manifest (``--manifest``): ssh login, experiment-LAN IP and hardware type per node;
* a hosts file (``--hosts-file``), Block's ``block/config/hosts`` format extended with ``key=value`` options.

Example::

    python -m block.deploy.inventory --manifest manifest.xml --user alice --name a30x3
    python -m block.deploy.inventory --hosts-file hosts --name lab --instances-per-host 2 --print
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import posixpath
import re
import sys
import unicodedata
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from omegaconf import OmegaConf

ROLES = ("engine", "scheduler")
GPU_MODES = ("auto", "yes", "no")
DEFAULT_WORKDIR = "~/block-deploy"
CLUSTER_DIR = Path(__file__).resolve().parents[2] / "conf" / "cluster"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class InventoryError(ValueError):
    """Bad manifest / hosts file / cluster config; the message names the host/line/key."""


@dataclass(frozen=True)
class HardwareInfo:
    """What a CloudLab node type brings, so a manifest alone gives the right engine count per host."""

    gpu: str
    instances: int
    description: str


# One engine per GPU, as in Block (tensor parallelism 1 for the 7B/8B models of the paper).
HARDWARE = {
    "d7525": HardwareInfo("yes", 1, "1x NVIDIA A30 24GB"),
    "d8545": HardwareInfo("yes", 4, "4x NVIDIA A100 40GB"),
    "c240g5": HardwareInfo("yes", 1, "1x NVIDIA P100 12GB"),
}
UNKNOWN_HARDWARE = HardwareInfo("auto", 1, "unknown: GPU detected with nvidia-smi at setup")


def hardware_info(hardware: Optional[str]) -> HardwareInfo:
    """The table entry for a node type; unknown types get one instance and GPU auto-detection."""
    return HARDWARE.get(hardware or "", UNKNOWN_HARDWARE)


# ------------------------------------------------------------------------------------------------------ text checks

# Control and format characters (\n, \r, \t, NUL, ESC, U+0085, U+2028/9, bidi overrides): no host name, user, address
# or path needs one, and each can split or disguise the remote output that deploy steps parse (a work directory with
# a newline once made teardown compare the wrong line of `pwd; echo $HOME` and aim `rm -rf` at $HOME).
CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
TEXT_FIELDS = ("name", "address", "user", "internal_ip", "workdir", "hardware")  # every free-text field of a Host


def control_characters(text: str, allowed: str = "") -> list[str]:
    """The control/format characters of ``text`` (each once, in order), except those in ``allowed``."""
    found = [c for c in text if c not in allowed and unicodedata.category(c) in CONTROL_CATEGORIES]
    return list(dict.fromkeys(found))


def text_problem(value: str, where: str) -> Optional[str]:
    """Why ``value`` (an inventory string) is unusable, or None; the one check every inventory source goes through."""
    bad = control_characters(value)
    if bad:
        return f"{where}={value!r} contains control character(s) {', '.join(map(repr, bad))}"
    return None


def workdir_problem(workdir: str, where: str) -> Optional[str]:
    """Why a work directory would be dangerous to own, or None: teardown deletes it, so never ``/`` or ``$HOME``.

    Only what the string says is checked here; teardown resolves the path on the host and checks again.
    """
    problem = text_problem(workdir, where)
    if problem:
        return problem
    norm = posixpath.normpath(workdir)
    if norm in ("/", "//", "~", ".") or ".." in norm.split("/"):
        return (f"{where}={workdir!r} is / or the home directory or above it; teardown deletes the work directory, "
                f"so give it a folder of its own (default {DEFAULT_WORKDIR})")
    return None


def host_text_problems(h: "Host", where: Optional[str] = None) -> list[str]:
    """Every free-text field of ``h`` that fails :func:`text_problem`, and an unsafe workdir; ``where`` names the
    host's source (a hosts-file line, a manifest node; default the host)."""
    where = where or f"host {h.name!r}"
    check = {"workdir": workdir_problem}
    problems = [check.get(f, text_problem)(v, f"{where}: {f}") for f in TEXT_FIELDS
                if isinstance(v := getattr(h, f), str)]
    return [p for p in problems if p]


def _raise_problems(problems: list[str]) -> None:
    """One InventoryError naming every problem (a no-op when there are none)."""
    if len(problems) == 1:
        raise InventoryError(problems[0])
    if problems:
        raise InventoryError("\n  - ".join(["invalid host:", *problems]))


# --------------------------------------------------------------------------------------------------------------- Host


@dataclass
class Host:
    """One machine of the deployment, as stored under ``cluster.hosts`` (see :meth:`to_dict`)."""

    name: str                      # e.g. node0 (unique)
    address: str                   # what ssh connects to (hostname or IP)
    user: Optional[str] = None     # ssh user (None: ssh's default / ~/.ssh/config)
    port: int = 22                 # ssh port
    internal_ip: Optional[str] = None  # the address other hosts reach this one on (experiment LAN); default = address
    instances: int = 1             # engines (each with its predictor side-car) here; 0 for a scheduler-only host
    roles: list[str] = field(default_factory=lambda: ["engine"])  # subset of ROLES
    gpu: str = "auto"              # "auto" (detect with nvidia-smi at setup) | "yes" | "no"
    workdir: str = DEFAULT_WORKDIR  # where the venv, the project and the runs live on that host
    hardware: Optional[str] = None  # e.g. d7525 (from the manifest)
    service_ports: Optional[dict[str, int]] = None  # base ports on this host ({engine, predictor, scheduler});
    #                                                 unset ones come from mode.ports (8000, 8100, 8200)

    @property
    def ip(self) -> str:
        """The address services on other hosts use: the LAN IP when known (CloudLab's public names are slower)."""
        return self.internal_ip or self.address

    @property
    def ssh_target(self) -> str:
        """``user@address:port`` (``address:port`` without a user), for messages and tables."""
        address = f"[{self.address}]" if ":" in self.address else self.address  # IPv6 literal
        user = f"{self.user}@" if self.user else ""
        return f"{user}{address}:{self.port}"

    def to_dict(self) -> dict:
        """All fields as plain YAML-friendly values (a copy: editing it does not touch the host)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "cluster.hosts[?]") -> "Host":
        """Build a host from a config entry, checking each key, so a hand-edited config fails before any ssh."""
        if OmegaConf.is_config(d):
            d = OmegaConf.to_container(d, resolve=True)
        if not isinstance(d, Mapping):
            raise InventoryError(f"{where}: expected a mapping of host keys, got {type(d).__name__} {d!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            raise InventoryError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(known)})")
        for key in ("name", "address"):
            if key not in d:
                raise InventoryError(f"{where}: missing required key '{key}'")
        host = cls(
            name=_req_str(d["name"], f"{where}.name"),
            address=_req_str(d["address"], f"{where}.address"),
            user=_opt_str(d.get("user"), f"{where}.user"),
            port=_int(d.get("port", 22), f"{where}.port"),
            internal_ip=_opt_str(d.get("internal_ip"), f"{where}.internal_ip"),
            instances=_int(d.get("instances", 1), f"{where}.instances", minimum=0),
            roles=_roles(d.get("roles", ["engine"]), f"{where}.roles"),
            gpu=_gpu(d.get("gpu", "auto"), f"{where}.gpu"),
            workdir=_req_str(d.get("workdir", DEFAULT_WORKDIR), f"{where}.workdir"),
            hardware=_opt_str(d.get("hardware"), f"{where}.hardware"),
            service_ports=_service_ports(d.get("service_ports"), f"{where}.service_ports"),
        )
        _raise_problems(host_text_problems(host, where))
        return host


SERVICE_KINDS = ("engine", "predictor", "scheduler")


def _service_ports(value: Any, where: str) -> Optional[dict[str, int]]:
    """``{engine: 9000, ...}`` (a mapping, or ``engine:9000,predictor:9100`` text); ports in 1..65535."""
    if value is None:
        return None
    if isinstance(value, str):
        pairs = [x.split(":", 1) if ":" in x else [x, ""] for x in value.split(",") if x.strip()]
        value = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(value, Mapping):
        raise InventoryError(f"{where}={value!r} must map {', '.join(SERVICE_KINDS)} to ports")
    out = {}
    for k, v in value.items():
        if k not in SERVICE_KINDS:
            raise InventoryError(f"{where}: unknown service {k!r} (known: {', '.join(SERVICE_KINDS)})")
        port = _int(v, f"{where}.{k}", minimum=1)
        if port > 65535:
            raise InventoryError(f"{where}.{k}={port} is not a TCP port")
        out[k] = port
    return out or None


def _req_str(value: Any, where: str) -> str:
    """A non-empty string without control characters (numbers are not silently turned into host names)."""
    if not isinstance(value, str) or not value.strip():
        raise InventoryError(f"{where}={value!r} must be a non-empty string")
    problem = text_problem(value, where)
    if problem:
        raise InventoryError(problem)
    return value


def _opt_str(value: Any, where: str) -> Optional[str]:
    """A non-empty string or None."""
    return None if value is None else _req_str(value, where)


def _int(value: Any, where: str, minimum: Optional[int] = None) -> int:
    """An integer; strings of digits are accepted because hosts files and CLI values are text."""
    if isinstance(value, bool):
        raise InventoryError(f"{where}={value!r} is not an integer")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise InventoryError(f"{where}={value!r} is not an integer") from None
    if not isinstance(value, int):
        raise InventoryError(f"{where}={value!r} is not an integer")
    if minimum is not None and value < minimum:
        raise InventoryError(f"{where}={value} must be >= {minimum}")
    return value


def _roles(value: Any, where: str) -> list[str]:
    """A list of roles from ROLES; a comma string is accepted (hosts files, hand edits)."""
    if isinstance(value, str):
        value = [r.strip() for r in value.split(",") if r.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(r, str) for r in value):
        raise InventoryError(f"{where}={value!r} must be a list of roles from {list(ROLES)}")
    bad = [r for r in value if r not in ROLES]
    if bad:
        raise InventoryError(f"{where}: unknown role(s) {', '.join(map(repr, bad))} (known: {', '.join(ROLES)})")
    return list(dict.fromkeys(value))  # drop duplicates, keep order


def _gpu(value: Any, where: str) -> str:
    """auto | yes | no; YAML 1.1 reads an unquoted ``gpu: yes`` as True, so booleans are mapped back."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value not in GPU_MODES:
        raise InventoryError(f"{where}={value!r} must be one of {', '.join(GPU_MODES)}")
    return value


# ----------------------------------------------------------------------------------------------------------- manifest


def _local(tag: Any) -> str:
    """The tag without its ``{namespace}``: rspec v2/v3 and extension namespaces all match the same way."""
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _children(elem: ET.Element, name: str) -> list[ET.Element]:
    """Direct children with local tag ``name``."""
    return [c for c in elem if _local(c.tag) == name]


def _find_all(elem: ET.Element, name: str) -> list[ET.Element]:
    """All descendants with local tag ``name``, document order."""
    return [e for e in elem.iter() if e is not elem and _local(e.tag) == name]


def _parse_xml(xml_text: str) -> ET.Element:
    """Parse or explain: a truncated download or an HTML login page is the usual culprit."""
    try:
        return ET.fromstring(xml_text)
    except ET.ParseError as e:
        raise InventoryError(f"manifest is not valid XML: {e}") from None


def _link_interfaces(root: ET.Element) -> dict[str, set[str]]:
    """link client_id -> the interface client_ids on it."""
    links: dict[str, set[str]] = {}
    for link in _find_all(root, "link"):
        lid = link.get("client_id")
        if lid:
            links[lid] = {ref.get("client_id") for ref in _children(link, "interface_ref") if ref.get("client_id")}
    return links


def _pick_login(node: ET.Element, name: str, user: Optional[str]) -> Optional[ET.Element]:
    """The node's ssh login for ``user`` (one login per project member), or the first one when no user is given."""
    logins = [lg for s in _children(node, "services") for lg in _children(s, "login")]
    ssh = [lg for lg in logins if lg.get("authentication", "ssh-keys") == "ssh-keys"] or logins
    if user is None:
        return ssh[0] if ssh else None
    for lg in ssh:
        if lg.get("username") == user:
            return lg
    if not ssh:
        return None  # no logins at all: fall back to <host>, keep the given user
    present = ", ".join(repr(lg.get("username")) for lg in ssh)
    raise InventoryError(f"manifest node {name!r}: no ssh login for user {user!r} (users present: {present})")


def _node_address(node: ET.Element, name: str, login: Optional[ET.Element]) -> str:
    """Login hostname, else ``<host name>``, else ``<host ipv4>``."""
    hosts = _children(node, "host")
    candidates = [login.get("hostname") if login is not None else None]
    candidates += [h.get(attr) for h in hosts for attr in ("name", "ipv4")]
    for c in candidates:
        if c:
            return c
    raise InventoryError(f"manifest node {name!r} has no address (no <login hostname=...> and no <host name/ipv4>)")


def _interface_ip(iface: ET.Element) -> Optional[str]:
    """The (first ipv4) address configured on an interface."""
    ips = _children(iface, "ip")
    ips.sort(key=lambda ip: ip.get("type", "ipv4") != "ipv4")
    return next((ip.get("address") for ip in ips if ip.get("address")), None)


def _node_internal_ip(node: ET.Element, name: str, lan: Optional[str], links: dict[str, set[str]]) -> Optional[str]:
    """The node's IP on ``lan`` (or on its first interface with an IP when no LAN is named)."""
    ifaces = _children(node, "interface")
    if lan is None:
        return next((ip for ip in map(_interface_ip, ifaces) if ip), None)
    on_lan = [i for i in ifaces if i.get("client_id") in links[lan]]
    ip = next((ip for ip in map(_interface_ip, on_lan) if ip), None)
    if ip is None:
        raise InventoryError(f"manifest node {name!r} has no interface with an IP on link {lan!r}")
    return ip


def _node_hardware(node: ET.Element) -> Optional[str]:
    """``<hardware_type name>``, else the emulab ``<vnode hardware_type>`` extension."""
    for hw in _children(node, "hardware_type"):
        if hw.get("name"):
            return hw.get("name")
    for vnode in _children(node, "vnode"):
        if vnode.get("hardware_type"):
            return vnode.get("hardware_type")
    return None


def _manifest_host(node: ET.Element, index: int, user: Optional[str], lan: Optional[str],
                   links: dict[str, set[str]]) -> Host:
    """One ``<node>`` -> Host; the first node also gets the scheduler role, as Block's first host."""
    name = node.get("client_id")
    if not name:
        raise InventoryError(f"manifest node #{index} has no client_id")
    login = _pick_login(node, name, user)
    hardware = _node_hardware(node)
    info = hardware_info(hardware)
    port = login.get("port", "22") if login is not None else 22
    host = Host(
        name=name,
        address=_node_address(node, name, login),
        user=login.get("username") if login is not None and login.get("username") else user,
        port=_int(port, f"manifest node {name!r} login port", minimum=1),
        internal_ip=_node_internal_ip(node, name, lan, links),
        instances=info.instances,
        roles=["engine", "scheduler"] if index == 0 else ["engine"],
        gpu=info.gpu,
        hardware=hardware,
    )
    _raise_problems(host_text_problems(host, f"manifest node {name!r}"))  # XML may carry &#10; and friends
    return host


def parse_manifest(xml_text: str, user: Optional[str] = None, lan: Optional[str] = None) -> list[Host]:
    """Hosts of a CloudLab (GENI RSpec) manifest, in document order.

    ``user`` picks among the per-member ssh logins; ``lan`` names the ``<link client_id>`` whose IPs the services
    use to reach each other (default: each node's first interface IP).
    """
    root = _parse_xml(xml_text)
    nodes = _children(root, "node")  # rspec nodes are top-level; nested extension elements are not hosts
    if not nodes:
        raise InventoryError("manifest has no <node> elements (is this the manifest of a running experiment?)")
    links = _link_interfaces(root)
    if lan is not None and lan not in links:
        raise InventoryError(f"manifest has no link {lan!r} (links: {', '.join(map(repr, links)) or 'none'})")
    return [_manifest_host(node, i, user, lan, links) for i, node in enumerate(nodes)]


# --------------------------------------------------------------------------------------------------------- hosts file

HOSTS_FILE_KEYS = ("name", "ip", "instances", "roles", "gpu", "workdir", "port", "hardware", "service_ports")


def _split_target(target: str, where: str) -> tuple[Optional[str], str, Optional[int]]:
    """``[user@]address[:port]`` -> (user, address, port); ``[v6]:port`` and bare IPv6 literals work too."""
    user, _, hostport = target.rpartition("@")
    port: Optional[str] = None
    if hostport.startswith("["):
        address, _, rest = hostport[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise InventoryError(f"{where}: cannot read {target!r} as [user@]address[:port]")
            port = rest[1:]
    elif hostport.count(":") == 1:
        address, _, port = hostport.partition(":")
    else:
        address = hostport
    if not address:
        raise InventoryError(f"{where}: {target!r} has no address")
    if "@" in target and not user:
        raise InventoryError(f"{where}: {target!r} has an empty user")
    return user or None, address, None if port is None else _int(port, f"{where}: port", minimum=1)


def _split_options(tokens: Sequence[str], where: str) -> dict[str, str]:
    """``key=value`` tokens -> dict; unknown or repeated keys are errors (a typo must not be ignored)."""
    options: dict[str, str] = {}
    for tok in tokens:
        key, eq, value = tok.partition("=")
        if not eq:
            raise InventoryError(f"{where}: expected key=value after the host, got {tok!r}")
        if key not in HOSTS_FILE_KEYS:
            raise InventoryError(f"{where}: unknown key {key!r} (known: {', '.join(HOSTS_FILE_KEYS)})")
        if key in options:
            raise InventoryError(f"{where}: key {key!r} given twice")
        options[key] = value
    return options


@dataclass
class _HostLine:
    """A parsed hosts-file line before default roles are assigned (they depend on the other lines)."""

    host: Host
    explicit_roles: Optional[list[str]]


def _parse_host_line(line: str, index: int, where: str, default_user: Optional[str] = None) -> _HostLine:
    """One non-comment line -> host; ``index`` is the host's position (for the default name node<i>)."""
    bad = control_characters(line, allowed="\t")  # tabs separate fields; anything else would be swallowed by split
    if bad:
        raise InventoryError(f"{where}: control character(s) {', '.join(map(repr, bad))} in {line!r}")
    target, *tokens = line.split()
    if "=" in target:
        raise InventoryError(f"{where}: expected [user@]address[:port] first, got {target!r}")
    user, address, port = _split_target(target, where)
    opts = _split_options(tokens, where)
    if "port" in opts:
        opt_port = _int(opts["port"], f"{where}: port", minimum=1)
        if port is not None and port != opt_port:
            raise InventoryError(f"{where}: port given twice ({port} and port={opt_port})")
        port = opt_port
    hardware = opts.get("hardware") or None
    info = hardware_info(hardware)
    instances = _int(opts["instances"], f"{where}: instances", minimum=0) if "instances" in opts else info.instances
    roles = _roles(opts["roles"], f"{where}: roles") if "roles" in opts else None
    host = Host(
        name=opts.get("name") or f"node{index}",
        address=address,
        user=user or default_user,
        port=port if port is not None else 22,
        internal_ip=opts.get("ip") or None,
        instances=instances,
        roles=roles if roles is not None else [],
        gpu=_gpu(opts.get("gpu", info.gpu), f"{where}: gpu"),
        workdir=opts.get("workdir") or DEFAULT_WORKDIR,
        hardware=hardware,
        service_ports=_service_ports(opts.get("service_ports"), f"{where}: service_ports"),
    )
    _raise_problems(host_text_problems(host, where))
    return _HostLine(host, roles)


def _default_roles(lines: list[_HostLine]) -> None:
    """Hosts without ``roles=``: engine (if they have instances); the first also schedules unless a line says who."""
    explicit_scheduler = any("scheduler" in (hl.explicit_roles or []) for hl in lines)
    for i, hl in enumerate(lines):
        if hl.explicit_roles is not None:
            continue
        roles = ["engine"] if hl.host.instances > 0 else []
        if i == 0 and not explicit_scheduler:
            roles.append("scheduler")
        hl.host.roles = roles


def parse_hosts_file(text: str, source: str = "hosts file", user: Optional[str] = None) -> list[Host]:
    """Hosts of a pssh-style file: ``[user@]address[:port] [key=value ...]`` per line, ``#`` comments.

    ``user`` is the ssh user for lines without ``user@`` (the CLI's ``--user``). Lines end at ``\n`` only (a
    ``\r\n`` ending is fine): ``str.splitlines`` would also break at a stray ``\r``, ``\x0b`` or U+2028 and turn
    the rest of a line into a host of its own, where this check names the line instead.
    """
    lines: list[_HostLine] = []
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r").split("#", 1)[0].strip(" \t")
        if line:
            lines.append(_parse_host_line(line, len(lines), f"{source} line {lineno}", user))
    if not lines:
        raise InventoryError(f"{source}: no hosts (expected one [user@]address[:port] per line)")
    _default_roles(lines)
    return [hl.host for hl in lines]


# ------------------------------------------------------------------------------------------------- config and checks


def cluster_config(hosts: Sequence[Host], name: str, source: str = "") -> dict:
    """The cluster config: ``num_instances`` = the engines on the hosts, so ``cluster=<name>`` uses them all.

    ``source`` (the manifest or hosts file) is kept under ``source`` when given, for the header and for the record.
    """
    config: dict = {"name": name, "num_instances": sum(h.instances for h in hosts if "engine" in h.roles)}
    if source:
        config["source"] = source
    config["hosts"] = [h.to_dict() for h in hosts]
    return config


def hosts_from_config(cluster: Mapping) -> list[Host]:
    """The validated hosts of a composed ``cfg.cluster`` (DictConfig or dict)."""
    if OmegaConf.is_config(cluster):
        cluster = OmegaConf.to_container(cluster, resolve=True)
    name = cluster.get("name", "?") if isinstance(cluster, Mapping) else "?"
    if not isinstance(cluster, Mapping) or cluster.get("hosts") is None:
        raise InventoryError(
            f"cluster={name} has no hosts: mode=deploy needs a cluster config made by python -m block.deploy.inventory "
            f"(--manifest manifest.xml | --hosts-file hosts) --name <name>, then cluster=<name>")
    entries = cluster["hosts"]
    if not isinstance(entries, (list, tuple)):
        raise InventoryError(f"cluster.hosts must be a list of hosts, got {type(entries).__name__}")
    hosts = [Host.from_dict(d, f"cluster.hosts[{i}]") for i, d in enumerate(entries)]
    validate_hosts(hosts)
    return hosts


def _host_problems(h: Host) -> list[str]:
    """What is wrong with one host on its own."""
    problems = []
    if not 1 <= h.port <= 65535:
        problems.append(f"host {h.name!r}: port {h.port} is not in 1..65535")
    bad = [r for r in h.roles if r not in ROLES]
    if bad:
        problems.append(f"host {h.name!r}: unknown role(s) {bad} (known: {list(ROLES)})")
    if not h.roles:
        problems.append(f"host {h.name!r} has no roles (give it roles=engine and/or scheduler, or remove it)")
    if "engine" in h.roles and h.instances < 1:
        problems.append(f"host {h.name!r} has the engine role but instances={h.instances} (needs >= 1)")
    if "engine" not in h.roles and h.instances > 0:
        problems.append(f"host {h.name!r} has instances={h.instances} but not the engine role")
    if h.gpu not in GPU_MODES:
        problems.append(f"host {h.name!r}: gpu={h.gpu!r} is not one of {', '.join(GPU_MODES)}")
    return problems + host_text_problems(h)


def validate_hosts(hosts: Sequence[Host]) -> None:
    """Check the hosts as a whole; one InventoryError lists every problem, so one edit fixes them all."""
    problems: list[str] = []
    if not hosts:
        problems.append("no hosts")
    seen: dict[str, int] = {}
    for h in hosts:
        seen[h.name] = seen.get(h.name, 0) + 1
    problems += [f"host name {n!r} is used {c} times (names must be unique)" for n, c in seen.items() if c > 1]
    for h in hosts:
        problems += _host_problems(h)
    if hosts and not scheduler_hosts(hosts):
        problems.append("no host has the scheduler role (add roles=engine,scheduler to one, or use --scheduler)")
    if hosts and sum(h.instances for h in hosts if "engine" in h.roles) < 1:
        problems.append("no engine instances in total (at least one host needs the engine role and instances >= 1)")
    if problems:
        raise InventoryError("invalid hosts:\n  - " + "\n  - ".join(problems))


def scheduler_hosts(hosts: Sequence[Host]) -> list[Host]:
    """Hosts with the scheduler role, in order; the first also runs the benchmark client (as in Block)."""
    return [h for h in hosts if "scheduler" in h.roles]


def engine_slots(hosts: Sequence[Host], num_instances: Optional[int] = None) -> list[tuple[Host, int]]:
    """(host, local index) per engine, host by host; instance i of the run is slot i, so runs can use fewer."""
    slots = [(h, i) for h in hosts if "engine" in h.roles for i in range(h.instances)]
    if num_instances is None:
        return slots
    if num_instances < 0:
        raise InventoryError(f"cluster.num_instances={num_instances} must be >= 0")
    if num_instances > len(slots):
        raise InventoryError(f"cluster.num_instances={num_instances} but the hosts have {len(slots)} engine slots")
    return slots[:num_instances]


def _header(source: str) -> str:
    """The comment line that says where a config came from and that hand edits are fine."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"# generated by python -m block.deploy.inventory from {source or '?'} on {date}; edit freely\n"


def render_cluster_config(config: dict) -> str:
    """Header comment + YAML, exactly what :func:`write_cluster_config` writes."""
    return _header(str(config.get("source", ""))) + OmegaConf.to_yaml(OmegaConf.create(config))


def write_cluster_config(config: dict, path: str | os.PathLike) -> Path:
    """Write atomically (``vidur.records.write_atomic``) so a concurrent composition never reads half a config."""
    from vidur.records import write_atomic  # here: `fab --list` need not import pandas

    return write_atomic(path, render_cluster_config(config).encode())


# ---------------------------------------------------------------------------------------------------------------- CLI


def _host_table(hosts: Sequence[Host]) -> str:
    """One line per host: what will run where, to check before deploying."""
    rows = [("name", "ssh", "internal ip", "inst", "roles", "gpu")]
    rows += [(h.name, h.ssh_target, h.ip, str(h.instances), ",".join(h.roles), h.gpu) for h in hosts]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m block.deploy.inventory",
        description="Turn a CloudLab manifest or a pssh-style hosts file into a cluster config "
                    "(conf/cluster/<name>.yaml) for mode=deploy. The first host runs the scheduler and the "
                    "benchmark beside its engine(s), unless --scheduler or a roles= option says otherwise.",
        epilog="examples:\n"
               "  python -m block.deploy.inventory --manifest manifest.xml --user alice --name a30x12\n"
               "  python -m block.deploy.inventory --hosts-file hosts --name lab --instances-per-host 2 --print\n"
               "then: python -m experiments.run cluster=a30x12 mode=deploy ...\n\n"
               "hosts file lines: [user@]address[:port] [key=value ...], keys: " + ", ".join(HOSTS_FILE_KEYS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", type=Path, metavar="FILE", help="CloudLab manifest.xml (Experiment > Manifest)")
    src.add_argument("--hosts-file", type=Path, metavar="FILE", help="[user@]address[:port] [key=value ...] per line")
    parser.add_argument("--name", required=True, help="cluster name: conf/cluster/<name>.yaml, used as cluster=<name>")
    parser.add_argument("--user", help="ssh user (manifest: pick this member's login; hosts file: lines without user@)")
    parser.add_argument("--lan", metavar="LINK", help="manifest link client_id whose IPs the services use "
                                                      "(default: each node's first interface)")
    parser.add_argument("--out", type=Path, help="output file (default: conf/cluster/<name>.yaml in the repository)")
    parser.add_argument("--instances-per-host", type=int, metavar="N", help="engines on every engine host")
    parser.add_argument("--scheduler", metavar="HOSTNAME", help="host name (e.g. node3) that runs the scheduler")
    parser.add_argument("--gpu", choices=GPU_MODES, help="override GPU use on every host")
    parser.add_argument("--workdir", metavar="DIR", help=f"override the remote work dir (default {DEFAULT_WORKDIR})")
    parser.add_argument("--service-ports", metavar="engine:P,predictor:P,scheduler:P",
                        help="base ports of the services on every host (default: mode.ports, 8000/8100/8200)")
    parser.add_argument("--print", dest="print_only", action="store_true", help="write the YAML to stdout instead")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    return parser


def _load_hosts(args: argparse.Namespace) -> tuple[list[Host], str]:
    """Hosts from the chosen source, and the source's name for the header."""
    path: Path = args.manifest or args.hosts_file
    try:
        text = path.read_text()
    except OSError as e:
        raise InventoryError(f"cannot read {path}: {e.strerror or e}") from None
    if args.manifest:
        try:
            return parse_manifest(text, user=args.user, lan=args.lan), str(path)
        except InventoryError as e:
            raise InventoryError(f"{path}: {e}") from None
    if args.lan:
        raise InventoryError("--lan only applies to --manifest (hosts files give ip= per line)")
    return parse_hosts_file(text, source=str(path), user=args.user), str(path)


def _apply_overrides(hosts: list[Host], args: argparse.Namespace) -> None:
    """--instances-per-host, --scheduler, --gpu, --workdir: the same change on every host."""
    if args.instances_per_host is not None:
        if args.instances_per_host < 1:
            raise InventoryError(f"--instances-per-host={args.instances_per_host} must be >= 1")
        for h in hosts:
            if "engine" in h.roles:
                h.instances = args.instances_per_host
    if args.scheduler is not None:
        names = [h.name for h in hosts]
        if args.scheduler not in names:
            raise InventoryError(f"--scheduler {args.scheduler!r} is not a host (hosts: {', '.join(names)})")
        for h in hosts:
            h.roles = [r for r in h.roles if r != "scheduler"] + (["scheduler"] if h.name == args.scheduler else [])
    ports = _service_ports(args.service_ports, "--service-ports") if args.service_ports else None
    if args.workdir and (problem := workdir_problem(args.workdir, "--workdir")):
        raise InventoryError(problem)
    for h in hosts:
        h.gpu = args.gpu or h.gpu
        h.workdir = args.workdir or h.workdir
        if ports:
            h.service_ports = {**(h.service_ports or {}), **ports}


def _run(args: argparse.Namespace) -> None:
    """The CLI after argument parsing; raises InventoryError for anything the user must fix."""
    if not NAME_RE.match(args.name):
        raise InventoryError(f"--name {args.name!r}: use letters, digits, '_', '-' and '.' (it becomes a file name)")
    hosts, source = _load_hosts(args)
    _apply_overrides(hosts, args)
    validate_hosts(hosts)
    config = cluster_config(hosts, args.name, source=source)
    table = _host_table(hosts)
    if args.print_only:
        sys.stdout.write(render_cluster_config(config))
        print(table, file=sys.stderr)  # stdout stays valid YAML for redirection
        return
    out: Path = args.out or CLUSTER_DIR / f"{args.name}.yaml"
    if out.exists() and not args.force:
        raise InventoryError(f"{out} exists; pass --force to overwrite it")
    write_cluster_config(config, out)
    print(f"wrote {out}: cluster={args.name}, {config['num_instances']} instances on {len(hosts)} hosts")
    print(table)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; errors go to stderr with exit code 2 (no traceback: they are the user's to fix)."""
    args = _build_parser().parse_args(argv)
    try:
        _run(args)
    except (InventoryError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
