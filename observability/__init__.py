"""Metrics, tracing and logging; importable from anywhere."""
