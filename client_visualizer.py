#!/usr/bin/env python3
"""Live OpenCV view of a stream with its detections drawn (see --help)."""

import sys

from visionstream.cli.visualize import main

if __name__ == "__main__":
    sys.exit(main())
