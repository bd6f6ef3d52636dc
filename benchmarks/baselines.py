"""chunkflow against the baselines users would pick instead: the same as ``chunkflow bench``.

    python benchmarks/baselines.py [--lengths 4K,16K,32K] [--memory-budget 512MiB] ...

Megatron-LM-style padding and packing (with full recompute), Hugging Face transformers on
DataCollatorWithFlattening batches (with and without gradient checkpointing) and the ideal
(unchunked, no recompute, no padding), trained on the same model and LMSys-like data, one process
per configuration. Writes results/bench-<hardware>-<date>.{md,json,png}; see chunkflow/bench/.
"""

import sys
from pathlib import Path

from chunkflow.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.startswith("--output-dir") for a in args):
        args += ["--output-dir", str(Path(__file__).parent / "results")]
    sys.exit(main(["bench", *args]))
