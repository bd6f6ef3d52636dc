"""Training utilities: built-in synthetic data (the trainer lands with its own issue)."""
