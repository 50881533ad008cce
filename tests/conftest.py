"""Shared fixtures: a real Prometheus server (see tests/fixtures_prometheus.py)."""

pytest_plugins = ["tests.fixtures_prometheus"]
