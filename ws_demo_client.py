#!/usr/bin/env python3
"""Print the server's live detection events from /ws, one JSON object per line (see --help)."""

import sys

from visionstream.cli.ws import main

if __name__ == "__main__":
    sys.exit(main())
