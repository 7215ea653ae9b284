"""The per-host agent: per-plane heartbeats, its own view of the planes, the isolation response hook."""
