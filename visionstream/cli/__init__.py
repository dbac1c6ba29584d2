"""The command-line entry points' shared parts: logging, signals, the stress_test.py command."""
