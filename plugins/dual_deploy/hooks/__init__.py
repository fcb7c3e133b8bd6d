"""Hooks: one per external service (GCS object IO, the local model registry and endpoint, mobile publishers)."""
