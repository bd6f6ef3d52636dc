"""Will it fit, and how fast? The real training step on fake tensors, at real scale.

``chunkflow plan --dry-run`` (:func:`chunkflow.dryrun.layout.dry_run`) builds and runs what
``chunkflow train`` would, once per rank role, with tensors that have shapes, dtypes and devices
but no data, and reports peak device memory by category (as the CUDA caching allocator counts
it), host pinned memory, FLOPs, a roofline step time and MFU for a named GPU
(:mod:`chunkflow.plan.gpus`). The private torch APIs it needs live in
:mod:`chunkflow.parallel.fake` (the one package that talks to
torch.distributed).
"""
