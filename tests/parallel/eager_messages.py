"""``python -m tests.parallel.eager_messages train ...``: chunkflow's command line with the stage
I/O's earlier message order (``eager_send``), to show that
a torchrun run under ``CHUNKFLOW_CHECK_MESSAGES=1`` stops on an order that deadlocks under
NCCL although gloo runs it."""

import sys

from chunkflow.cli import main
from chunkflow.parallel.pipeline import P2PStageIO
from tests.parallel.stage_messages import eager_send

P2PStageIO._send = eager_send

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
