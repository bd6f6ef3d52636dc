"""Which is faster under chunkflow: a Hugging Face model as is, or the reference model with its
weights (``--model.implementation=hf|reference``)?

Builds a random Qwen2-shaped checkpoint, loads it both ways, and times one
``engine.forward_backward`` of the same long-tail batch, alternating the two implementations
(fastest of ``--repeats`` each), in one process. Prints and saves the table.

    python benchmarks/hf_vs_reference.py [--repeats 3] [--chunk-size 1024]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from chunkflow import ChunkFlowEngine  # noqa: E402
from chunkflow.models import load_hf_checkpoint  # noqa: E402
from chunkflow.train.data.synthetic import sample_lengths  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--max-len", type=int, default=8192)
    args = parser.parse_args()

    config = transformers.Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=704,
                                      num_hidden_layers=4, num_attention_heads=8,
                                      num_key_value_heads=2)
    rng = random.Random(0)
    lengths = sample_lengths(rng, 24, max_len=args.max_len)
    lengths[0] = args.max_len  # one chain of max_len / chunk_size chunks
    batch = [torch.randint(0, config.vocab_size, (n,)) for n in lengths]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.Qwen2ForCausalLM(config).save_pretrained(tmp)
        models = {
            "hf": transformers.AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.float32, attn_implementation="sdpa"),
            "reference": load_hf_checkpoint(tmp, dtype=torch.float32),
        }
    engines = {name: ChunkFlowEngine(m, chunk_size=args.chunk_size, k=1)
               for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    losses = {}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, engine in engines.items():
            models[name].zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            losses[name] = float(engine.forward_backward(batch).loss)
            times[name].append(time.perf_counter() - t0)
    tokens = sum(lengths)
    best = {name: min(t[1:]) for name, t in times.items()}
    rows = [f"| {name} | {best[name]:.3f} | {tokens / best[name]:.0f} | "
            f"{best[name] / best['reference']:.2f} | {losses[name]:.6f} |" for name in engines]
    md = (f"# HF model as is vs reference model with its weights\n\n"
          f"`python benchmarks/hf_vs_reference.py --repeats {args.repeats} --chunk-size "
          f"{args.chunk_size} --max-len {args.max_len}`: Qwen2 shape (hidden 256, 4 layers, 8/2 "
          f"heads, vocab 4096), float32, one batch of {len(lengths)} sequences, {tokens} tokens "
          f"(longest {max(lengths)}), chunk_size {args.chunk_size}, k=1; fastest of "
          f"{args.repeats} steps each, alternated in one process.\n\n"
          f"| implementation | step (s) | tokens/s | time vs reference | loss |\n|---|---|---|---|---|\n"
          + "\n".join(rows) + f"\n\nMachine: {machine()}\n")
    print(md)
    save("hf_vs_reference", {"machine": machine(), "tokens": tokens, "lengths": lengths,
                             "chunk_size": args.chunk_size, "best_s": best, "times_s": times,
                             "loss": losses}, md)


if __name__ == "__main__":
    main()
