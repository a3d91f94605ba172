"""Reconstruction metrics."""
