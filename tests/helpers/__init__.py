"""Helpers shared by the tests: real servers, tiny models, images, Prometheus."""
