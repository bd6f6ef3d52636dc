"""``chunkflow bench``: chunkflow against the baselines users would pick instead.

One process per measured configuration (:mod:`chunkflow.bench.worker`) trains the same model on
the same LMSys-like global batches (:mod:`chunkflow.bench.workload`) with one of the methods in
:mod:`chunkflow.bench.methods`; :mod:`chunkflow.bench.sweep` runs the sweep over maximum lengths,
picks each method's fastest configuration within a memory budget, and
:mod:`chunkflow.bench.report` writes the table and plots.
"""
