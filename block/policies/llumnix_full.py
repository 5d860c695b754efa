"""Full Llumnix (``llumnix_full``): Llumnix's dispatch rule plus its live migration of running requests.

Block's paper compares against Llumnix's dispatch rule alone (``llumnix``, "Llumnix-"); its artifact also runs full
Llumnix. Both use one load figure, freeness (``heuristics.llumnix_freeness``: free blocks less what the waiting
prompts need, per running request). Dispatch sends a request to the freest instance. Migration, as Llumnix's global
scheduler pairs instances (``defrag_constrained``, its default): every ``migration_interval_s`` the instances whose
freeness is below ``migrate_out_threshold`` (3.0, Llumnix's ``migrate_out_threshold``) are sorted from the least
free, those above it from the freest, and the i-th of one list migrates a request to the i-th of the other.

The mechanism (staged KV copy, the request decoding on the source until the last, blocking stage) is the
simulator's ``vidur.migration``; it runs in ``mode=sim`` only. Live migration of a real or emulated engine's KV cache
is not implemented, so the live modes refuse this policy (``MIGRATING_POLICIES``).
"""

from __future__ import annotations

from typing import Any, Mapping

from block.policies.heuristics import llumnix, llumnix_freeness
from vidur.migration import MigrationConfig, Migrator, Planner
from vidur.policy_contract import RoutingContext
from vidur.types import Candidate, InstanceStats, Request

MIGRATING_POLICIES = frozenset({"llumnix_full"})  # they need vidur.migration: mode=sim only
MIGRATE_OUT_THRESHOLD = 3.0


def pair_migrations(stats: list[InstanceStats], threshold: float = MIGRATE_OUT_THRESHOLD) -> list[tuple[int, int]]:
    """Llumnix's pairing: the least free instance below ``threshold`` sends to the freest above it, the second
    least free to the second freest, and so on; ties go to the lower instance id."""
    free = {s.instance_id: llumnix_freeness(s) for s in stats}
    out = sorted((i for i, f in free.items() if f < threshold), key=lambda i: (free[i], i))
    into = sorted((i for i, f in free.items() if f > threshold), key=lambda i: (-free[i], i))
    return list(zip(out, into))


def dispatch(request: Request, candidates: list[Candidate], ctx: RoutingContext, *,
             migrate_out_threshold: float = MIGRATE_OUT_THRESHOLD, migration_interval_s: float = 0.05,
             last_stage_max_blocks: int = 16, max_stages: int = 3, request_migration_policy: str = "SJF",
             stage_overhead_s: float = 0.0) -> int:
    """Llumnix's dispatch (``heuristics.llumnix``). The keyword parameters are the migration's (``make_migrator``
    reads them from the same policy config); they are declared here so that the policy registry checks their names."""
    return llumnix(request, candidates, ctx)


def make_migrator(params: Mapping[str, Any], *, kv_bytes_per_token: float, bandwidth_gbps: float) -> Migrator:
    """The migrator of a ``llumnix_full`` policy config (``params``: conf/policy/llumnix_full.yaml's keys; absent or
    null ones take ``dispatch``'s defaults). ``kv_bytes_per_token``: one GPU's share of a token's KV cache;
    ``bandwidth_gbps``: one GPU's share of the link between two instances (GB/s). Raises ValueError on bad values."""
    p = {k: v for k, v in params.items() if v is not None}
    threshold = float(p.get("migrate_out_threshold", MIGRATE_OUT_THRESHOLD))
    cfg = MigrationConfig(
        kv_bytes_per_token=float(kv_bytes_per_token), bandwidth_gbps=float(bandwidth_gbps),
        interval_s=float(p.get("migration_interval_s", 0.05)),
        last_stage_max_blocks=int(p.get("last_stage_max_blocks", 16)), max_stages=int(p.get("max_stages", 3)),
        stage_overhead_s=float(p.get("stage_overhead_s", 0.0)),
        request_policy=str(p.get("request_migration_policy", "SJF")),
    )
    planner: Planner = lambda stats: pair_migrations(stats, threshold)
    return Migrator(cfg, planner)
