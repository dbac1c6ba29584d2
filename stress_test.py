"""Multi-camera load generator for a running visionstream server (see --help)."""

import sys

from visionstream.cli.stress import main

if __name__ == "__main__":
    sys.exit(main())
