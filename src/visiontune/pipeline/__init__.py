"""Orchestration: the whole train command (train -> finish -> calibrate -> report), compare and the demo."""
