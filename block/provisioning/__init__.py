"""Auto-provisioning (the paper's Fig 8): an initial pool plus a back pool, grown reactively or predictively."""

from block.provisioning.controller import ProvisioningConfig, ProvisioningController

__all__ = ["ProvisioningConfig", "ProvisioningController"]
