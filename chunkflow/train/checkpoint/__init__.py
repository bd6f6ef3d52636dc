"""Saved runs: one verified directory per step (:mod:`.store`), saved and loaded on any layout
(:mod:`.io`), the model as a Hugging Face directory (:mod:`.export`), and where a run resumes
(:mod:`.resume`). "Checkpoint" here always means a saved run; recomputing activations in
backward is "activation checkpointing" or "recompute"."""
