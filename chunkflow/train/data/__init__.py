"""Training data: records read from files (JSONL, Parquet, compressed, `datasets` directories) or
generated, tokenized (chat templates included), streamed into global batches, and checked before
a run (``chunkflow data check``)."""
