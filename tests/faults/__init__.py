"""Fault injection: real nats-server and registry processes on 127.0.0.1, killed and restarted."""
