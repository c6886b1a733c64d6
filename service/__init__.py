"""cnnserve: train CNN image classifiers and serve them."""

__version__ = "0.1.0"
