"""Command-line entry points (dpdm-train, dpdm-sample, dpdm-data)."""
from pathlib import Path

# Configs live at the repository root (conf/), next to src/; dpdm is installed editable (make install).
CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "conf")
