"""Training: configuration, data, the trainer loop, checkpoints and run reports."""


class TrainingError(RuntimeError):
    """The run cannot go on (for example a non-finite loss); the last checkpoint is left intact."""


class CheckpointSpaceError(TrainingError):
    """A checkpoint did not fit on the device; the message is one line naming the directory and
    the bytes needed. The partial checkpoint was removed and older ones are intact."""
