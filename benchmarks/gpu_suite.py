"""The GPU suite: frontier rows on a LLaMA-7B shape (peak memory, step time, istune plan beside) and SmolLM2 runs.

    bash scripts/setup.sh && .venv/bin/python benchmarks/gpu_suite.py       # = istune bench gpu; one GPU, <= 10 min
    .venv/bin/python benchmarks/gpu_suite.py --tiny                         # CPU smoke test, tiny shapes

The suite lives in :mod:`istune.bench.gpu_suite`; this script only calls it.
Results go to ``benchmarks/results/gpu_suite.{json,md}``, written after every row.
"""

import sys

from istune.bench.gpu_suite import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
