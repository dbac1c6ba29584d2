"""visionstream: real-time multi-stream YOLOv8 inference over TCP with a FastAPI control plane."""
