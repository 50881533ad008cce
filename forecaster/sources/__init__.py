"""Where history comes from: Prometheus, a CSV file, a replayed trace."""
