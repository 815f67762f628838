"""Our packages' logs in a replica's Serve log (every deployment calls this first; no torch here)."""

from __future__ import annotations

import logging


def route_logs_to_serve() -> None:
    """Send our packages' INFO logs to the replica's Serve log (they are silent in a bare worker otherwise)."""
    serve_logger = logging.getLogger("ray.serve")
    for name in ("generator", "retriever", "serve"):
        lg = logging.getLogger(name)
        lg.setLevel(logging.INFO)
        for h in serve_logger.handlers:
            if h not in lg.handlers:
                lg.addHandler(h)
        lg.propagate = False
