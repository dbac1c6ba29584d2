"""The server: config, lifecycle, connections, the fair scheduler, lanes, stats and the HTTP control plane."""
