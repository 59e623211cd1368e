"""Sparse-cache generation."""
