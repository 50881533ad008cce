"""Helpers the tests share: a real Prometheus, REST clients, scaler builders, waiting."""
