"""`worldstream` command line: one sub-command per job."""
from __future__ import annotations

import argparse
import sys


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB"


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .models.configs import TWO_EXPERTS, VARIANTS
    from .models.dit import WanDiT

    print(f"{'variant':18} {'params':>16} {'blocks':>6} {'block params':>13} {'bf16':>9} {'fp8':>9}  experts")
    for name, cfg in VARIANTS.items():
        with torch.device("meta"):
            model = WanDiT(cfg)
        n = sum(p.numel() for p in model.parameters())
        nb = sum(p.numel() for p in model.blocks[0].parameters())
        experts = 2 if name in TWO_EXPERTS else 1
        print(f"{name:18} {n:>16,} {cfg.num_layers:>6} {nb:>13,} {_gb(2 * n):>9} {_gb(n):>9}  {experts}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="worldstream", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list the model variants and their sizes").set_defaults(fn=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
