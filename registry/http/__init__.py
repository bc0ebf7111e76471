"""`registry http`: the original plan's REST API, metrics and a dashboard over the registry."""
