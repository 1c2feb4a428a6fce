"""Thin wrapper: python benchmarks/training.py [args] == based bench train [args] (see based/bench/train.py)."""
import sys

from based.bench.train import main

if __name__ == "__main__":
    sys.exit(main())
