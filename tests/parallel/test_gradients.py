"""Distributed steps equal one process on the whole global batch (float64, CPU, gloo ranks).

Batches mix chains and packed chunks, with masked prompts; each rank checks the gradients of the
parameters it holds against plain unchunked training of the whole batch.
"""

from tests.parallel.workers import check_gradients, check_hf_ddp, spawn


def test_two_ranks_data_parallel_and_pipeline():
    spawn(check_gradients, 2, [
        dict(dp=2, pp=1, k=1, data_parallel="ddp", steps=2),
        dict(dp=2, pp=1, k=2, data_parallel="fsdp", steps=2),
        dict(dp=2, pp=1, k=1, data_parallel="ddp", normalization="sequence"),
        dict(dp=2, pp=1, k=1, data_parallel="ddp", lengths=(50,)),   # one replica gets nothing
        dict(dp=2, pp=1, k=2, data_parallel="fsdp", lengths=(50,)),
        dict(dp=1, pp=2, k=1),
        dict(dp=1, pp=2, k=2, steps=2),
    ])


def test_four_ranks_pipeline_and_data_x_pipeline():
    spawn(check_gradients, 4, [
        dict(dp=1, pp=4, k=1),
        dict(dp=1, pp=4, k=2),
        dict(dp=2, pp=2, k=1, data_parallel="ddp", steps=2),
        dict(dp=2, pp=2, k=2, data_parallel="fsdp", steps=2),
        dict(dp=2, pp=2, k=1, data_parallel="ddp", lengths=(50,)),
    ])


def test_two_ranks_data_parallel_hugging_face_model():
    spawn(check_hf_ddp, 2)
