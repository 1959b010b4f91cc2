"""Scoring preprocessing modes and model presets against references."""
