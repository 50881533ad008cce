"""What people and Prometheus look at: the HTML page, plots, and /metrics."""

from __future__ import annotations

from flask import Blueprint

blueprint = Blueprint("pages", __name__)
