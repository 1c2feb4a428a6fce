"""Thin wrapper: python benchmarks/generation.py [args] == based bench generate [args] (see based/bench/generate.py)."""
import sys

from based.bench.generate import main

if __name__ == "__main__":
    sys.exit(main())
