"""Time per optimizer step of LoRA, LoRA + random sparse, LoRA + IST and LISA-style tuning: ``istune bench time``.

    PYTHONPATH=src .venv/bin/python benchmarks/step_time.py                  # = istune bench time
    PYTHONPATH=src .venv/bin/python benchmarks/step_time.py --steps 4 --rounds 2

The benchmark lives in :mod:`istune.bench.timing`; this script only calls it.
Results go to ``benchmarks/results/step_time.{json,md}``.
"""

import sys

from istune.bench.timing import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
