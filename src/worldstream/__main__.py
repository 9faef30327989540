"""`python -m worldstream <command> ...`, and so `torchrun --nproc_per_node N -m worldstream generate ... --ulysses N`:
the `worldstream` command (cli.py)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
