"""Turning a search archive into deployable, measured ONNX models."""
