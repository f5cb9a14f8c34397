"""The relay: applications send their monitor events to a sidecar daemon."""
