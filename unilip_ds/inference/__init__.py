"""Inference entry points (reconstruct, generate, edit)."""
