"""Model runtimes: one small contract (:class:`service.runtimes.base.Runtime`), several
implementations chosen by setting through :func:`create_runtime`."""

from service.runtimes.factory import create_runtime

__all__ = ["create_runtime"]
