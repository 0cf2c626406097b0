"""Run the benchmark (same as `personamagic bench`, docs/performance.md); see personamagic/cli/bench_run.py.

    python benchmarks/bench.py [--device cuda] [--steps 1000] [--output benchmarks/results/x.json]
"""

import sys

from personamagic.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
