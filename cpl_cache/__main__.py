"""`python -m cpl_cache` (also what `torchrun -m cpl_cache extract ...` runs on every rank)."""

from cpl_cache.cli import main

if __name__ == "__main__":
    main()
