"""Deploying taps: ``backbone`` (feature_info), ``export`` (ONNX, pt2, TorchScript) and the check of written files."""
