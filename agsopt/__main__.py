"""``python -m agsopt``: the study command line (:mod:`agsopt.study.cli`)."""

import sys

from agsopt.study.cli import main

if __name__ == "__main__":
    sys.exit(main())
