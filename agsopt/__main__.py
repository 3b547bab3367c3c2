"""``python -m agsopt``: the study command line (:mod:`agsopt.study.cli`).

After Ctrl-C the process ends with :func:`os._exit` (status 130) once the finished runs are
kept and the resume command printed. A normal interpreter exit would segfault there: the
``KeyboardInterrupt`` usually lands while XLA compiles or runs a step on its own threads,
Python unwinds out of the call without waiting for them, and interpreter finalization then
tears down the runtime those threads still use (exit 139). Nothing is left to flush by then:
every run file was written and closed as its run ended.
"""

import os
import sys

from agsopt.study.cli import INTERRUPTED, main


def _exit(status: int) -> None:
    """Exit with ``status``; after an interrupt, without interpreter finalization."""
    if status == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    _exit(main())
