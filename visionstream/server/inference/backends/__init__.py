"""One module per detector backend, each a `Detector` (`inference.api`): placeholder, ultralytics, OpenVINO."""
