"""Inference behind one method: the detector backends, letterbox, the YOLOv8 head and image decoding."""
