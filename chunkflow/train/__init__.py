"""Training: configuration, data, the trainer loop, checkpoints and run reports."""


class TrainingError(RuntimeError):
    """The run cannot go on (for example a non-finite loss); the last checkpoint is left intact."""
