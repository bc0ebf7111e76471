"""Operator tools: the `registry` commands that read NATS directly (workers, get,
stats, events, explain, watch), their rendering, and the health check."""
