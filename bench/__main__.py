"""`python -m bench`: see bench/harness.py and --help."""

import sys

from bench.harness import main

sys.exit(main())
