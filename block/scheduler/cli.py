"""Command line of the global scheduler: ``python -m block.scheduler``."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Optional, Sequence

from block.service import add_common_args

DEFAULT_PORT = 8200  # Block's global scheduler port
UPSTREAM_TOKEN_ENV = "BLOCK_UPSTREAM_TOKEN"
TOKENIZERS = ("llama2", "qwen2", "none")


def _policy_help() -> str:
    from block.policies import describe_policies

    return "; ".join(f"{n}: {d}" for n, d in describe_policies().items())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m block.scheduler",
        description="Block's global scheduler: a stateless OpenAI-compatible front door. For each request it samples "
                    "k instances, asks their predictors concurrently (POST /predict or GET /stats, as the policy "
                    "needs), applies the routing policy and streams the answer back through the chosen predictor.",
        epilog="Policies -- " + _policy_help(),
    )
    add_common_args(ap, DEFAULT_PORT)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--instances", default=None,
                     help="comma-separated predictor base URLs (http://host:port); requests are forwarded through "
                          "them. The instance index (x-block-instance) is the position in this list")
    src.add_argument("--instances-file", default=None,
                     help="file with the predictor URLs: one per line (# comments), or a YAML/JSON list")
    ap.add_argument("--policy", default=None, metavar="NAME",
                    help="routing policy: a built-in one (listed below), an installed plug-in (entry point group "
                         "block_repro.policies) or, with --policy-target, your rule's name (default: the "
                         "--policy-config's name, else block; 'custom' with --policy-target)")
    ap.add_argument("--policy-target", default=None, metavar="PACKAGE.MODULE:FUNCTION",
                    help="your own rule by import path (docs/adding_a_policy.md); its package must be importable")
    ap.add_argument("--policy-signal", default=None, choices=("none", "stats", "prediction"),
                    help="what --policy-target's rule reads (default: its `signal` attribute, else none)")
    ap.add_argument("--policy-config", default=None,
                    help="a conf/policy/<name>.yaml-style file (name, k, noise, parameters); the flags below "
                         "override it")
    ap.add_argument("--k", default=None,
                    help="instances probed per request (an integer, or 'all'); default: the policy's own "
                         "(block*: 2, others: all)")
    ap.add_argument("--length-noise-pct", type=float, default=None,
                    help="Block's noise on the output length told to each probed instance (default: the policy's, "
                         "25 for block_noisy, else 0)")
    ap.add_argument("--latency-noise-pct", type=float, default=None,
                    help="Block's noise on each predicted e2e before the argmin (block* policies; default 0)")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="a policy parameter, e.g. --param queue_weight=1 (repeatable; values parsed as YAML)")
    ap.add_argument("--probe-timeout-ms", type=float, default=1000.0,
                    help="how long to wait for the probes; a predictor that does not answer in time is left out "
                         "(default 1000)")
    ap.add_argument("--default-output-tokens", type=int, default=None,
                    help="expected output length of a request that carries no hint (header x-expected-output-tokens "
                         "or body expected_output_tokens); default: its max_tokens")
    ap.add_argument("--length-estimator", default="none", metavar="none|cpu|auto|FILE.npz|CHECKPOINT_DIR",
                    help="estimate the output length of requests that carry no hint from their prompt text: none "
                         "(default), cpu (the shipped numpy estimator), auto (a transformer checkpoint from "
                         "$BLOCK_LENGTH_CHECKPOINT when a GPU is present, else cpu), an .npz CPU model or a "
                         "transformer checkpoint directory. Token-id prompts and failures use the default length")
    ap.add_argument("--estimator-max-batch", type=int, default=32,
                    help="prompts per length-estimator call (default 32)")
    ap.add_argument("--estimator-wait-ms", type=float, default=2.0,
                    help="batching window of the length estimator: prompts arriving within it of the first one "
                         "share one call (default 2 ms; 0 = only those already queued)")
    ap.add_argument("--max-retries", type=int, default=2,
                    help="re-dispatches of a request whose instance fails before the first token (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the scheduler's random draws (sampling, ties)")
    ap.add_argument("--log-file", default=None, help="append one JSON line per request here (flushed per line)")
    ap.add_argument("--upstream-token", default=os.environ.get(UPSTREAM_TOKEN_ENV),
                    help=f"bearer token sent to the predictors (default: ${UPSTREAM_TOKEN_ENV}; unset = none)")
    ap.add_argument("--tokenizer", choices=TOKENIZERS, default="llama2",
                    help="how text prompts are counted (as the emulated engine: bundled tokenizer, or "
                         "none = ceil(utf8 bytes / 4)); token-id prompts count their length")
    ap.add_argument("--connect-timeout-s", type=float, default=5.0, help="connect timeout to an instance")
    ap.add_argument("--upstream-timeout-s", type=float, default=1800.0,
                    help="longest wait for the next piece of an instance's answer (Block: backend_timeout 1800)")
    ap.add_argument("--down-cooldown-s", type=float, default=2.0,
                    help="an instance that refused a connection is left out of the sampling this long (0 = never)")
    ap.add_argument("--max-connections", type=int, default=4096, help="connection pool size to the instances")
    add_provisioning_args(ap)
    return ap


def add_provisioning_args(ap: argparse.ArgumentParser) -> None:
    """Auto-provisioning (Fig 8, ``block.scheduler.provisioning``): --instances is the initial pool."""
    g = ap.add_argument_group("auto-provisioning (Fig 8): --instances are the initial pool, the rest a back pool")
    g.add_argument("--provision-config", default=None,
                   help="a conf/provisioning/<name>.yaml-style file (strategy, slo_s, metric, cooldown_s, "
                        "scale_down...); enables auto-provisioning. initial_instances is the number of --instances")
    g.add_argument("--provision-slots", type=int, default=None,
                   help="instances in all (initial + back pool); the back-pool slots are numbered after --instances")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--provision-agent", default=None,
                     help="URL of a provisioning agent: POST <agent>/slots/<i> starts slot i and answers its "
                          "predictor URL, DELETE stops it (the driver of mode=emulate and mode=deploy runs one)")
    src.add_argument("--provision-command", default=None,
                     help="shell command run to start slot {slot}; its last stdout line is the predictor URL")
    g.add_argument("--provision-stop-command", default=None,
                   help="with --provision-command: shell command run to stop slot {slot} on scale-down (without "
                        "it a scaled-down slot keeps running); an agent stops it (DELETE <agent>/slots/<i>)")
    lease = g.add_mutually_exclusive_group()
    lease.add_argument("--provision-lock-dir", default=None,
                       help="directory shared by every scheduler: one O_EXCL lock file per slot, so exactly one "
                            "scheduler starts a slot and the others adopt it (omit with a single scheduler)")
    lease.add_argument("--provision-agent-lease", action="store_true",
                       help="the --provision-agent holds the slot leases (schedulers on several hosts, mode=deploy)")
    g.add_argument("--provision-drain-timeout-s", type=float, default=600.0,
                   help="scale-down: longest wait for a slot's requests to finish before it is stopped (default 600)")
    g.add_argument("--provision-time-scale", type=float, default=1.0,
                   help="model seconds per wall second (mode=emulate's time_scale): the SLO, cooldown and windows "
                        "are in model seconds (default 1)")
    g.add_argument("--provision-log", default=None,
                   help="append one JSON line per provisioning event (start, ready, adopt, remove...) here")
    g.add_argument("--provision-start-timeout-s", type=float, default=600.0,
                   help="longest start of a slot, until its predictor is healthy (default 600)")


def make_provisioning(args: argparse.Namespace, sched) -> None:
    """Attach a ``LivePool`` to ``sched`` when --provision-config is given (flags checked here)."""
    if not args.provision_config:
        for flag in ("provision_slots", "provision_agent", "provision_command", "provision_lock_dir",
                     "provision_stop_command"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --provision-config")
        if args.provision_agent_lease:
            raise ValueError("--provision-agent-lease needs --provision-config")
        return
    import yaml

    from block.provisioning import ProvisioningConfig, ProvisioningController
    from block.scheduler.provisioning import AgentLease, AgentStarter, CommandStarter, LivePool, SlotLease

    try:
        with open(args.provision_config) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError("expected a mapping")
        loaded["initial_instances"] = len(sched.instances)
        pc = ProvisioningConfig.from_dict(loaded)
    except (yaml.YAMLError, TypeError, ValueError) as err:
        raise ValueError(f"provisioning config {args.provision_config}: {err}") from None
    if pc.strategy == "predictive" and sched.policy.signal != "prediction":
        raise ValueError(f"provisioning strategy predictive needs predicted latencies: policy {sched.policy.name} "
                         "predicts none (use the block family)")
    slots = args.provision_slots
    if slots is None or slots < len(sched.instances):
        raise ValueError(f"--provision-slots={slots} must be >= the {len(sched.instances)} --instances")
    if slots > len(sched.instances) and not (args.provision_agent or args.provision_command):
        raise ValueError("a back pool needs a way to start it: --provision-agent or --provision-command")
    if not args.provision_start_timeout_s > 0:
        raise ValueError(f"--provision-start-timeout-s={args.provision_start_timeout_s} must be > 0")
    if not args.provision_drain_timeout_s >= 0:
        raise ValueError(f"--provision-drain-timeout-s={args.provision_drain_timeout_s} must be >= 0")
    if args.provision_agent_lease and not args.provision_agent:
        raise ValueError("--provision-agent-lease needs --provision-agent")
    if args.provision_stop_command and not args.provision_command:
        raise ValueError("--provision-stop-command needs --provision-command")
    token = args.upstream_token or None
    starter = (AgentStarter(args.provision_agent, token, args.provision_start_timeout_s)
               if args.provision_agent else CommandStarter(args.provision_command or "false",
                                                           args.provision_start_timeout_s,
                                                           args.provision_stop_command))
    lease = AgentLease(args.provision_agent, token) if args.provision_agent_lease \
        else SlotLease(args.provision_lock_dir)
    pool = LivePool(ProvisioningController(pc), slots, starter, lease,
                    time_scale=args.provision_time_scale, event_log=args.provision_log,
                    health_timeout_s=args.provision_start_timeout_s, drain_timeout_s=args.provision_drain_timeout_s,
                    poll_s=0.5 if args.provision_agent_lease else 0.2)  # the agent's lease: a round trip
    pool.attach(sched)


def _parse_value(v: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(v)
    except yaml.YAMLError:
        return v


def make_policy_from_args(args: argparse.Namespace):
    """The RoutingPolicy the arguments describe, and the mapping that built it."""
    from block.policies import policy_from_config
    from block.policies.registry import CUSTOM, policy_spec

    cfg: dict[str, Any] = {}
    if args.policy_config:
        import yaml

        with open(args.policy_config) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.policy_config}: expected a mapping")
        cfg.update(loaded)
    if args.policy and cfg.get("name") not in (None, args.policy):
        raise ValueError(f"--policy {args.policy} contradicts {args.policy_config} (name: {cfg.get('name')})")
    for key in ("target", "signal"):
        if getattr(args, f"policy_{key}") is not None:
            cfg[key] = getattr(args, f"policy_{key}")
    name = cfg["name"] = args.policy or cfg.get("name") or (CUSTOM if cfg.get("target") else "block")
    spec = policy_spec(name, cfg.get("target"), cfg.get("signal"))  # a clear error for an unknown or bad one
    from block.policies.llumnix_full import MIGRATING_POLICIES

    if name in MIGRATING_POLICIES:  # routing it here would silently be its dispatch rule alone
        raise ValueError(f"--policy {name} migrates running requests' KV caches between engines, which only the "
                         "simulator implements (mode=sim); live migration is not implemented")
    if args.k is not None:
        k = str(args.k).strip().lower()
        if k in ("all", "none", "null", "0"):
            cfg["k"] = None
        else:
            try:
                cfg["k"] = int(k)
            except ValueError:
                raise ValueError(f"--k must be an integer or 'all', got {args.k!r}") from None
    elif "k" not in cfg:
        cfg["k"] = spec.default_k
    if args.length_noise_pct is not None:
        cfg["length_noise_pct"] = args.length_noise_pct
    if args.latency_noise_pct is not None:
        cfg["latency_noise_pct"] = args.latency_noise_pct
    for kv in args.param:
        if "=" not in kv:
            raise ValueError(f"--param expects KEY=VALUE, got {kv!r}")
        key, v = kv.split("=", 1)
        cfg[key.strip()] = _parse_value(v)
    return policy_from_config(cfg), cfg


def make_scheduler(args: argparse.Namespace):
    from block.scheduler.core import Scheduler, SchedulerConfig, read_instances_file

    if args.instances_file:
        urls = read_instances_file(args.instances_file)
    elif args.instances:
        urls = [u for u in args.instances.split(",") if u.strip()]
    else:
        raise ValueError("give the instances: --instances URL[,URL...] or --instances-file FILE")
    policy, pcfg = make_policy_from_args(args)
    if args.probe_timeout_ms <= 0:
        raise ValueError(f"--probe-timeout-ms={args.probe_timeout_ms} must be > 0")
    cfg = SchedulerConfig(
        instances=urls, policy=policy, probe_timeout_s=args.probe_timeout_ms / 1e3,
        default_output_tokens=args.default_output_tokens, max_retries=args.max_retries, seed=args.seed,
        log_file=args.log_file, upstream_token=args.upstream_token or None, tokenizer=args.tokenizer,
        connect_timeout_s=args.connect_timeout_s, upstream_timeout_s=args.upstream_timeout_s,
        down_cooldown_s=args.down_cooldown_s, max_connections=args.max_connections, policy_config=pcfg,
        length_estimator=args.length_estimator, estimator_max_batch=args.estimator_max_batch,
        estimator_wait_ms=args.estimator_wait_ms,
    )
    sched = Scheduler(cfg)
    make_provisioning(args, sched)
    return sched


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(name)s %(message)s")
    from block.service import limits_from_args

    try:
        limits = limits_from_args(args)
        sched = make_scheduler(args)
    except (ValueError, OSError) as err:
        ap.error(str(err))
    from block.scheduler.app import build_app
    from block.scheduler.serving import serve

    app = build_app(sched, token=args.token, max_body_bytes=args.max_body_bytes)
    serve(app, args.host, args.port, args.log_level, limits=limits)


if __name__ == "__main__":
    main()
