"""The REST API under /api/v1 (JSON in, JSON out, one error shape)."""

from __future__ import annotations

from flask import Blueprint

blueprint = Blueprint("api", __name__)
