"""`cnnserve bench`: throughput and latency, beside the physical limit, with how they
were made.

- :mod:`~service.bench.sweep` starts the gateway per (workers, batching) setting and
  drives it with wrk (:mod:`~service.bench.wrk`) over concurrency levels, watching the
  server's CPU and memory (:mod:`~service.bench.process`); the tutorial-style reference
  server under ``loadtests/`` takes the same load;
- :mod:`~service.bench.limits` measures HTTP, decode + resize and inference alone and
  turns them into the limit each point is compared with;
- :mod:`~service.bench.advisor` picks batching settings for a p99 SLO;
- :mod:`~service.bench.plot` and :mod:`~service.bench.tables` present the report;
- :mod:`~service.bench.runtime_table` times each runtime at several batch sizes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
