"""A training run: the trainer loop, the process it lives in (device, distributed context,
signals), its lock on the run directory, held-out evaluation, metrics and the report."""
