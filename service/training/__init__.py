"""Offline training: datasets, architectures, the training loop, evaluation, export."""
