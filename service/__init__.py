"""cnnserve: train CNN image classifiers and serve them."""

import os

# Before anything imports grpc, which reads it once: its core logs at INFO unless told,
# one line per failed TLS handshake, so any client could fill the log (plain HTTP sent
# to the gRPC port). Its errors still show; GRPC_VERBOSITY set by the operator wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

__version__ = "0.1.0"
