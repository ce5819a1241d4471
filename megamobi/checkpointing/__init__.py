"""Checkpoints: layout-independent model weight files, DeepSpeed optimizer state, manifests, resume."""
