"""``mode=deploy``: the run on real hosts over ssh -- the same services, records and figures as ``mode=emulate``.

One run, as Block's authors ran theirs with parallel-ssh scripts, but driven by the run's Hydra config:

1. connect to every host of ``cluster.hosts`` (a cluster config made by ``python -m block.deploy.inventory``);
2. ``setup`` (idempotent: a no-op while the project and install options are unchanged);
3. build the plan: engine slot i of the cluster = an engine (stock vLLM on a GPU host, else the emulated engine)
   on ``127.0.0.1:ports.engine+j`` of its host and its predictor side-car on ``internal_ip:ports.predictor+j``;
   ``mode.num_schedulers`` schedulers on the scheduler hosts (``internal_ip:ports.scheduler+k``);
4. upload configs, plan and workload; stop leftovers of an earlier run; start engines, then predictors, then
   schedulers, each stage awaited healthy on every host (a half-started cluster is reported as such);
5. run the benchmark client on the first scheduler host (``python -m experiments.drive``), which writes the run
   records there; 6. collect records and every host's logs into the local run directory (``hosts/<host>/``) and
   publish the records with ``summary.json`` last; 7. stop the services (unless ``mode.keep_running``).

Secrets: the bearer token (``$BLOCK_API_TOKEN``) and ``$HF_TOKEN`` travel to the hosts on
stdin, never on a command line, in a file of the repo, in ``config.yaml`` or in a log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Optional, Sequence

from omegaconf import DictConfig

from experiments import wiring
from experiments.emulate import engine_args, redacted_yaml, scheduler_args, vllm_sized
from experiments.wiring import ConfigError
from vidur.types import EngineConfig

log = logging.getLogger("experiments.deploy")

ENGINE_KINDS = ("auto", "emulated", "vllm")
RECORD_FILES = ("config.yaml", "requests.parquet", "instances.parquet")
ENGINE_FILES = ("model.yaml", "gpu.yaml", "engine.yaml")  # what engine_args writes: an engine's whole config


def workdir_of(run_dir: str) -> str:
    """The host's work directory of a remote run directory (``<workdir>/runs/<run id>``)."""
    return str(PurePosixPath(run_dir).parent.parent)


# ---------------------------------------------------------------------------------------------- config
def hosts_of(cfg: DictConfig):
    """The cluster's hosts, validated; a ConfigError names what is wrong."""
    from block.deploy.inventory import InventoryError, hosts_from_config, validate_hosts

    try:
        hosts = hosts_from_config(cfg.cluster)
        validate_hosts(hosts)
    except InventoryError as err:
        raise ConfigError(f"cluster={cfg.cluster.get('name')}: {err}") from err
    return hosts


def check(cfg: DictConfig):
    """The deploy-specific checks (before any ssh): returns the hosts."""
    from block.deploy.inventory import InventoryError, engine_slots, scheduler_hosts

    m = cfg.mode
    hosts = hosts_of(cfg)
    problems = []
    if str(m.engine) not in ENGINE_KINDS:
        problems.append(f"mode.engine={m.engine} must be one of {', '.join(ENGINE_KINDS)}")
    if str(m.engine) == "vllm" and float(m.time_scale) != 1.0:
        problems.append(f"mode.time_scale={m.time_scale} needs emulated engines: vLLM runs in real time")
    if m.get("token"):
        problems.append("mode.token: give the bearer token in $BLOCK_API_TOKEN, not in the config or on the command "
                        "line (where the shell history, `ps` and Hydra's .hydra/ folder would keep it)")
    if int(m.num_schedulers) < 1:
        problems.append(f"mode.num_schedulers={m.num_schedulers} must be >= 1")
    if not scheduler_hosts(hosts):
        problems.append("cluster.hosts: no host has the scheduler role")
    if str(m.state_source) not in ("auto", "engine", "proxy"):
        problems.append(f"mode.state_source={m.state_source} must be auto, engine or proxy")
    if _parallel_launcher():
        problems.append("hydra/launcher runs sweep points in parallel, but deploy runs share the hosts: sweep "
                        "mode=deploy with the default (sequential) launcher")
    try:
        engine_slots(hosts, int(cfg.cluster.num_instances))
    except InventoryError as err:
        problems.append(str(err))
    if problems:
        raise ConfigError("; ".join(problems))
    return hosts


def _parallel_launcher() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig

        target = str(HydraConfig.get().launcher.get("_target_", ""))
    except (ValueError, ImportError, AttributeError):  # not under Hydra's main (fab tasks, tests)
        return False
    return "BasicLauncher" not in target and target != ""


def engine_kinds(cfg: DictConfig, hosts, gpus: Mapping[str, int]) -> dict[str, str]:
    """``emulated`` or ``vllm`` per host: ``mode.engine=auto`` picks vLLM where a GPU was found."""
    want = str(cfg.mode.engine)
    kinds = {h.name: (want if want != "auto" else ("vllm" if gpus.get(h.name, 0) > 0 else "emulated"))
             for h in hosts}
    if float(cfg.mode.time_scale) != 1.0 and "vllm" in kinds.values():
        on = [h for h, k in kinds.items() if k == "vllm"]
        raise ConfigError(f"mode.time_scale={cfg.mode.time_scale} but {', '.join(on)} serve with vLLM, which runs in "
                          "real time (set mode.time_scale=1 or mode.engine=emulated)")
    return kinds


def run_id_of(run_dir: Path) -> str:
    """A file-name-safe id for the run on the hosts, unique per local run directory."""
    run_dir = Path(run_dir).resolve()
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", run_dir.name)[:60].strip("_.") or "run"
    return f"{slug}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}"


def secrets_of(cfg: DictConfig) -> dict[str, str]:
    """The secrets every service gets in its environment (only the ones that are set)."""
    token = os.environ.get("BLOCK_API_TOKEN")
    out: dict[str, str] = {}
    if token:
        for var in ("BLOCK_API_TOKEN", "BLOCK_UPSTREAM_TOKEN", "BLOCK_ENGINE_TOKEN"):
            out[var] = str(token)
    hf = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if hf:
        out["HF_TOKEN"] = hf
    return out


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """Everything a run puts on the hosts."""

    run_id: str
    plans: dict[str, dict[str, Any]]          # host -> hostctl plan
    files: dict[str, dict[str, bytes]]        # host -> path under runs/<run_id> -> content
    predictor_urls: list[str]
    scheduler_urls: list[str]
    bench_host: str

    @property
    def expected(self) -> dict[str, list[str]]:
        return {h: [s["name"] for s in p["services"]] for h, p in self.plans.items()}


def _rel(args: list[str], local_dir: Path, remote_prefix: str = "services") -> list[str]:
    """Rewrite paths under the local staging folder into paths relative to the run folder on the host."""
    prefix = str(local_dir)
    return [remote_prefix + a[len(prefix):] if a.startswith(prefix) else a for a in args]


def build_plan(cfg: DictConfig, hosts, kinds: Mapping[str, str], run_id: str, remote_dirs: Mapping[str, str],
               staging: Path, ecfg: Optional[EngineConfig] = None) -> Plan:
    """Per-host service lists (hostctl plans) and the files they read; ``staging`` gets the config files.
    ``ecfg``: the validated engine config of a run (None: built from ``cfg``, as for the fab tasks)."""
    from block.deploy.inventory import engine_slots, scheduler_hosts

    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    ports = cfg.mode.ports
    shared = _rel(engine_args(cfg, staging, ecfg), staging)
    engine_files = {f"services/{n}": (staging / n).read_bytes() for n in ENGINE_FILES}
    keep = bool(cfg.mode.get("keep_engines", False))
    engine_dir = "engines/" + hashlib.sha256(b"".join(engine_files.values())).hexdigest()[:16]
    scale = float(cfg.mode.time_scale)
    services: dict[str, list[dict[str, Any]]] = {h.name: [] for h in hosts}
    predictor_urls: list[str] = []

    def base(h, kind: str) -> int:  # the host's own ports (cluster config) win over mode.ports
        return int((h.service_ports or {}).get(kind, ports[kind]))

    for i, (h, j) in enumerate(engine_slots(hosts, int(cfg.cluster.num_instances))):
        kind = kinds[h.name]
        host_flags = vllm_sized(cfg, shared) if kind == "vllm" else shared
        eport, pport = base(h, "engine") + j, base(h, "predictor") + j
        engine_url = f"http://127.0.0.1:{eport}"
        # the same engine flags for both engines (block.engine.vllm takes the emulated engine's command line)
        eargv = ["python", "-m", "block.engine.vllm" if kind == "vllm" else "block.engine", "--host", "127.0.0.1",
                 "--port", str(eport), *host_flags]
        if kind == "vllm":
            eargv += ["--load-format", str(cfg.mode.vllm_load_format)]
        else:
            eargv += ["--time-scale", str(scale), "--seed", str(int(cfg.seed) + i)]
        source = str(cfg.mode.state_source)
        if source == "auto":
            source = "proxy" if kind == "vllm" else "engine"
        purl = f"http://{h.ip}:{pport}"
        pargv = ["python", "-m", "block.predictor", "--host", h.ip, "--port", str(pport), *host_flags,
                 "--engine-url", engine_url, "--instance-id", str(i), "--state-source", source]
        services[h.name] += [
            {"name": f"engine{i}", "role": "engine", "argv": eargv, "url": engine_url, "health": "/health", "env": {},
             **({"cwd": f"{workdir_of(remote_dirs[h.name])}/{engine_dir}"} if keep else {})},
            {"name": f"predictor{i}", "role": "predictor", "argv": pargv, "url": purl, "health": "/health",
             "env": {}},
        ]
        predictor_urls.append(purl)
    sched_hosts = scheduler_hosts(hosts)
    scheduler_urls: list[str] = []
    for k in range(int(cfg.mode.num_schedulers)):
        h = sched_hosts[k % len(sched_hosts)]
        port = base(h, "scheduler") + k // len(sched_hosts)
        url = f"http://{h.ip}:{port}"
        sargv = _rel(scheduler_args(cfg, predictor_urls, staging / f"scheduler{k}.jsonl"), staging)
        services[h.name].append({"name": f"scheduler{k}", "role": "scheduler",
                                 "argv": ["python", "-m", "block.scheduler", "--host", h.ip, "--port", str(port),
                                          *sargv], "url": url, "health": "/health", "env": {}})
        scheduler_urls.append(url)
    conf_files = {f"services/{p.name}": p.read_bytes() for p in sorted(staging.iterdir()) if p.suffix == ".yaml"}
    plans, files = {}, {}
    for h in hosts:
        if not services[h.name]:
            continue
        plans[h.name] = {"host": h.name, "run_id": run_id, "cwd": remote_dirs[h.name], "services": services[h.name]}
        files[h.name] = {**conf_files, "plan.json": json.dumps(plans[h.name], indent=1).encode()}
        if keep:  # engines outlive the run: their configs live beside them, named by content
            files[h.name].update({f"{workdir_of(remote_dirs[h.name])}/{engine_dir}/{rel}": data
                                  for rel, data in engine_files.items()})
    return Plan(run_id, plans, files, predictor_urls, scheduler_urls, sched_hosts[0].name)


# ---------------------------------------------------------------------------------------------- fleet
def open_fleet(cfg: DictConfig, hosts):
    from block.deploy.fleet import Fleet

    ssh = cfg.mode.get("ssh") or {}
    try:
        return Fleet(hosts, key_filename=ssh.get("key_filename"),
                     connect_timeout_s=float(ssh.get("connect_timeout_s", 15)))
    except ValueError as err:
        raise ConfigError(f"mode.ssh: {err}") from err


def install_options(cfg: DictConfig, kinds: Mapping[str, str]):
    from block.deploy.ops import InstallOptions

    inst = cfg.mode.get("install") or {}
    return InstallOptions(python=str(inst.get("python", "python3")),
                          system_site_packages=bool(inst.get("system_site_packages", False)),
                          pip_args=[str(a) for a in (inst.get("pip_args") or [])],
                          extras={h: ("vllm" if k == "vllm" else "") for h, k in kinds.items()})


def prepare(cfg: DictConfig, fleet, hosts, setup: Optional[bool] = None, say=log.info) -> dict[str, str]:
    """GPU detection and (unless disabled) the idempotent setup; returns the engine kind per host."""
    from block.deploy import ops

    kinds = engine_kinds(cfg, hosts, ops.detect_gpus(fleet))
    if cfg.mode.setup if setup is None else setup:
        ops.setup(fleet, install_options(cfg, kinds), log=say)
    return kinds


def start_cluster(cfg: DictConfig, fleet, hosts, kinds: Mapping[str, str], run_dir: Path, say=log.info,
                  ecfg: Optional[EngineConfig] = None, back: Any = None) -> Plan:
    """Upload the plan and start every service (stopping leftovers first); a DeployError if it only half-starts.
    ``back``: auto-provisioning's ``DeployBackPool``, which keeps the back-pool slots out of the start."""
    from block.deploy import ops

    run_id = run_id_of(run_dir)
    remote = {h.name: ops.run_dir_of(fleet, h, run_id) for h in hosts}
    plan = build_plan(cfg, hosts, kinds, run_id, remote, Path(run_dir) / "services", ecfg)
    if back is not None:
        back.split(plan, Path(run_dir) / "services")
    ops.push_run(fleet, run_id, plan.files)
    if cfg.mode.get("keep_engines", False):  # leftovers: all but the engines this plan keeps or restarts
        ops.stop(fleet, roles=["scheduler", "predictor"])
        ops.stop_unplanned(fleet, plan.expected)
    else:
        ops.stop(fleet)
    ops.start(fleet, run_id, plan.plans, secrets_of(cfg), float(cfg.mode.startup_timeout_s), log=say)
    return plan


def stop_after_run(cfg: DictConfig, fleet) -> None:
    """The end of a run: everything stops, or with ``mode.keep_engines`` all but the engines."""
    from block.deploy import ops

    if cfg.mode.keep_running:
        return
    ops.stop(fleet, roles=["scheduler", "predictor"] if cfg.mode.get("keep_engines", False) else None)


def run_deploy(cfg: DictConfig, run_dir: Path, ecfg: Optional[EngineConfig] = None) -> dict[str, Any]:
    """Run a validated ``cfg`` (``experiments.run.run_one``, which passes the engine config it built) on the
    cluster's hosts."""
    from block.deploy import ops

    t0 = time.perf_counter()
    hosts = check(cfg)  # the deploy-specific checks (hosts, engines); the config itself was validated by run_one
    requests = wiring.workload(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    from experiments.drive import write_requests

    phases: dict[str, float] = {}

    def timed(name: str, t: float) -> None:
        phases[f"deploy_{name}_s"] = round(time.perf_counter() - t, 3)

    with open_fleet(cfg, hosts) as fleet, sigterm_as_interrupt(), contextlib.ExitStack() as extras:
        t = time.perf_counter()
        kinds = prepare(cfg, fleet, hosts)
        timed("setup", t)
        back = extras.enter_context(back_pool(cfg, fleet, hosts))  # auto-provisioning, else None
        plan = None
        try:
            t = time.perf_counter()
            plan = start_cluster(cfg, fleet, hosts, kinds, run_dir, ecfg=ecfg, back=back)
            timed("start", t)
            t = time.perf_counter()
            bench = fleet.by_name[plan.bench_host]
            local_req = run_dir / "services" / "requests.jsonl"
            write_requests(requests, local_req)
            ops.push_run(fleet, plan.run_id, {bench.name: {"requests.jsonl": local_req.read_bytes(),
                                                           "config.yaml": redacted_yaml(cfg).encode()}})
            ops.run_on(fleet, bench, plan.run_id, [
                "-m", "experiments.drive", "--config", "config.yaml", "--requests", "requests.jsonl",
                "--schedulers", ",".join(plan.scheduler_urls), "--states", ",".join(plan.predictor_urls),
                "--out", "records", "--mode", "deploy", "--secrets-stdin"], secrets_of(cfg),
                stream=bool(cfg.get("progress", True)))
            timed("benchmark", t)
            if back is not None:  # starts and stops in flight finish and are recorded
                back.settle()
        finally:
            t = time.perf_counter()
            if plan is not None:
                try:
                    ops.collect(fleet, plan.run_id, run_dir, [fleet.by_name[h] for h in plan.plans])
                except Exception as err:  # noqa: BLE001 - a failed collect must not hide the run's own error
                    log.error("collect failed: %s", err)
            timed("collect", t)
            stop_after_run(cfg, fleet)
    records = run_dir / "hosts" / plan.bench_host / "records"
    extra = back.records(run_dir, records) if back is not None else {}
    return publish_records(run_dir, records, {"num_hosts": len(plan.plans), "engines": sorted(set(kinds.values())),
                                              "deploy_wall_s": round(time.perf_counter() - t0, 3), **phases, **extra})


def back_pool(cfg: DictConfig, fleet, hosts):
    """Auto-provisioning's back pool (``experiments.provision_live.DeployBackPool``, a context manager), or a null
    context when ``provisioning.enabled`` is false."""
    if not (cfg.get("provisioning") is not None and cfg.provisioning.get("enabled", False)):
        return contextlib.nullcontext(None)
    from experiments.provision_live import DeployBackPool

    secrets = secrets_of(cfg)
    return DeployBackPool(cfg, fleet, hosts, secrets, secrets.get("BLOCK_API_TOKEN"))


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a batch system's cancel) unwinds like Ctrl-C, so the services on the hosts are stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def publish_records(run_dir: Path, src: Path, extra: Mapping[str, Any]) -> dict[str, Any]:
    """Move the collected records into the run directory, ``summary.json`` last and atomically."""
    from vidur.records import write_text

    if not (src / "summary.json").exists():
        raise RuntimeError(f"the benchmark wrote no summary.json (see the logs under {run_dir / 'hosts'})")
    if (run_dir / "summary.json").exists():
        (run_dir / "summary.json").unlink()  # a rerun invalidates the old summary first
    for name in RECORD_FILES:
        if (src / name).exists():
            os.replace(src / name, run_dir / name)  # same file system: atomic
    summary = json.loads((src / "summary.json").read_text())
    summary.update(extra)
    shutil.rmtree(src)  # one copy of the records: analysis globs for summary.json
    write_text(run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    return summary


def cluster_overrides(cluster: str, tmp_dir: Path) -> list[str]:
    """Hydra overrides selecting ``cluster``: a name under conf/cluster, or a YAML path (copied into ``tmp_dir``,
    which joins the search path, so the path's config composes -- and takes overrides -- like a named one)."""
    path = Path(cluster).expanduser()
    if path.suffix not in (".yaml", ".yml"):
        return [f"cluster={cluster}"]
    if not path.is_file():
        raise ConfigError(f"cluster file {path} does not exist")
    (Path(tmp_dir) / "cluster").mkdir(parents=True, exist_ok=True)
    (Path(tmp_dir) / "cluster" / path.name).write_text(path.read_text())
    return [f"cluster={path.stem}", f"hydra.searchpath=[file://{Path(tmp_dir).resolve()}]"]


def compose(cluster: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The run config for the fab tasks: ``mode=deploy``, ``cluster`` by name (conf/cluster) or YAML path."""
    import tempfile

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with tempfile.TemporaryDirectory() as tmp:
        ov = ["mode=deploy", *cluster_overrides(cluster, Path(tmp)), *overrides]
        with initialize_config_dir(str(wiring.REPO_ROOT / "conf"), version_base="1.3"):
            return hydra_compose("config", overrides=ov)
