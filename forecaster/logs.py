"""One log format for the service's processes; the gRPC front's lines carry a tag."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FRONT_LOG_FORMAT = "%(asctime)s %(levelname)s [scaler-front] %(name)s: %(message)s"


def configure_logging(level: int | str, log_format: str = LOG_FORMAT) -> None:
    logging.basicConfig(level=level, format=log_format)
