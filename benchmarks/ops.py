"""Thin wrapper: python benchmarks/ops.py [args] == based bench ops [args] (see based/bench/ops.py)."""
import sys

from based.bench.ops import main

if __name__ == "__main__":
    sys.exit(main())
