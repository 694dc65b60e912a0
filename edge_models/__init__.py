"""ONNX models for edgeswarm: registry, runtime sessions, input limits, hardware probe."""
