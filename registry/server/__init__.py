"""The `registry up` process: app (composition root), projector, sweeper, query
service, store (the only bucket seam), provisioning and the embedded nats-server."""
