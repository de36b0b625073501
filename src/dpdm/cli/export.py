"""dpdm-export: the shareable file of a trained run (EMA weights + build config + privacy record).

    dpdm-export runs/quickstart                         # → runs/quickstart/export/model.safetensors
    dpdm-export runs/quickstart/checkpoints/last.ckpt --out model.safetensors

The export holds no optimizer, RNG or loop state and is safetensors (loading it cannot run code);
dpdm-sample ckpt=model.safetensors and dpdm-evaluate model.safetensors read it. docs/privacy.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpdm.cli.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dpdm-export", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("source", type=Path, help="a dpdm-train run dir or one of its checkpoints")
    ap.add_argument("--out", type=Path, default=None,
                    help="the .safetensors file (default <run dir>/export/model.safetensors)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = ap.parse_args(argv)

    from dpdm.training.checkpoint import load_checkpoint
    from dpdm.training.export import describe, export_checkpoint

    src = args.source
    ckpt_path = src / "checkpoints" / "last.ckpt" if src.is_dir() else src
    run_dir = src if src.is_dir() else src.parent.parent
    out = args.out or run_dir / "export" / "model.safetensors"
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out} must end in .safetensors (dpdm-sample recognises exports by it)")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite or choose another --out")
    record = export_checkpoint(load_checkpoint(ckpt_path), out)
    print(f"wrote {out}: EMA weights of {ckpt_path}; {describe(record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
