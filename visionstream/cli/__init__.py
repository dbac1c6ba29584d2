"""The command-line entry points (the top-level scripts and the console scripts call their `main`)."""
