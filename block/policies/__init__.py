"""Routing policies: each one a small pure function ``choose(request, candidates, ctx) -> instance_id``.

The simulator (``vidur.cluster``) and the live scheduler call the same functions. ``make_policy`` wraps a rule with
what it needs (signal, k, Block's length/latency noise) into a ``vidur.policy_contract.RoutingPolicy``.
``describe_policies()`` gives each name's one-line rule.
"""

from block.policies.common import argmax, argmin, inject_noise, noisy_length
from block.policies.registry import POLICIES, describe_policies, make_policy, policy_from_config, policy_names

__all__ = ["POLICIES", "argmax", "argmin", "describe_policies", "inject_noise", "make_policy", "noisy_length",
           "policy_from_config", "policy_names"]
