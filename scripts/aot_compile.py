#!/usr/bin/env python
"""AOT-compile every engine step for a TPU topology and print the per-device memory plan.

A thin wrapper over `python -m jaxinfer.aot` (see its --help); runs from a checkout without installing.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxinfer.aot.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
