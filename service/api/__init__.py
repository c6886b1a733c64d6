"""Transport adapters over :mod:`service.dataplane`: REST (FastAPI) and gRPC."""
