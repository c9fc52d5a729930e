"""torchrun as ``dtlab run`` and the tour start it: the same launcher (``torch.distributed.run``),
without the Python traceback of ``ChildFailedError`` that it prints whenever a rank exits
non-zero. A lab's own exit status carries its verdict (1: outside tolerance, 2: bad input, 3: a
failed collective) and its own message says why; the launcher's traceback says nothing more.

    python -m dtlab.launch.torchrun --standalone --nproc_per_node=2 -m labs.ddp --steps 5
"""
from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun


class _QuietVerdicts(logging.Filter):
    """Drops the agent's "failed (exitcode: N)" log line for the exit codes a lab uses for its
    verdict (1 outside tolerance, 2 bad input, 3 failed collective): the lab said why."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith("failed (exitcode: ")
                    and record.args and record.args[0] in (1, 2, 3))


def main(argv=None) -> int:
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_QuietVerdicts())
    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        # a rank killed by a signal has a negative exit code: report it the way a shell does
        code = failure.exitcode
        return code if 0 < code < 256 else 128 + (-code if code < 0 else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
