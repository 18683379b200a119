"""``python -m benchmarks.memory`` from the root of a clone."""

import sys

from . import main

sys.exit(main())
