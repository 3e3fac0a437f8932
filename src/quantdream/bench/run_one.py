"""Subprocess entry point of ``bench memory``: ``python -m quantdream.bench.run_one --spec JSON --result FILE``."""
import sys

from .memory import main

if __name__ == "__main__":
    sys.exit(main())
