#!/usr/bin/env python3
"""Real-time YOLOv8 inference server (see --help)."""

import sys

from visionstream.cli.server import main

if __name__ == "__main__":
    sys.exit(main())
