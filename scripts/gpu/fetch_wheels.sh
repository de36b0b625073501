#!/usr/bin/env bash
# Run HERE (with internet to the package registry) before a GPU check: the H200 machine has torch,
# torchvision, pytorch-lightning, torchmetrics, numpy and scipy, but not these (../shared/DESIGN.md).
# Pure-Python wheels, pinned to the versions in this venv, into .whl/ (git-ignored; carried to the device).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
pins=$($PY - <<'PYEOF'
from importlib.metadata import version
for name in ("opacus", "hydra-core", "omegaconf", "antlr4-python3-runtime"):
    print(f"{name}=={version(name)}")
PYEOF
)
# antlr4-python3-runtime 4.9.3 is an sdist only: `pip wheel` builds it; the others are wheels already.
$PY -m pip wheel -q --no-deps -w .whl $pins
ls -la .whl
du -sh .whl
