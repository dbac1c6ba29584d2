#!/usr/bin/env python3
"""Unified streaming client: webcam, video, image folder or synthetic frames to a server (see --help)."""

import sys

from visionstream.cli.client import main

if __name__ == "__main__":
    sys.exit(main())
