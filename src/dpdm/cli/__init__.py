"""Command-line entry points (dpdm-train, dpdm-sample, dpdm-data)."""
from dpdm.utils.configs import CONFIG_DIR

__all__ = ["CONFIG_DIR"]
