"""Client side: the connection, sources, the streaming loop, results, drawing and the /ws watcher."""
