"""The GPU suite: a LLaMA-7B shape on random weights, frontier rows (peak memory, step time, istune plan beside) and
training throughput (LoRA, LoRA + gradient checkpointing, IST with its probes), on one GPU.

    PYTHONPATH=src python3 benchmarks/gpu_suite.py --out FOLDER          # = istune bench gpu --out FOLDER; <= 9 min
    PYTHONPATH=src python3 benchmarks/gpu_suite.py --tiny --out FOLDER   # CPU smoke test, tiny shapes

It needs only torch, transformers, peft, accelerate, safetensors and pyyaml (a locked-down node's stack: no
setup, no download). The suite lives in :mod:`istune.bench.gpu_suite`; this script only calls it. Results go to
``FOLDER/gpu_suite.{json,md}``, written after every row; the table is printed at the end.
"""

import sys

from istune.bench.gpu_suite import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
