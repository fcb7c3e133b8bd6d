"""Training application: ``python -m dualml.trainer --help``.

Runs as a Vertex AI custom-training container entrypoint (reads AIP_MODEL_DIR,
AIP_CHECKPOINT_DIR, AIP_TENSORBOARD_LOG_DIR, TF_CONFIG) and as a local process.
"""
