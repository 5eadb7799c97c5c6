"""Throughput against the simulated provider: the engine beside two peer patterns.

The code lives in `adapters.bench` so that the installed CLI can run it too
(``python -m engine bench``); see its docstring for the scenarios.

    python benchmarks/throughput.py [--scenario rate|latency|both] [--scale 1.0]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.bench import main

if __name__ == "__main__":
    sys.exit(main())
