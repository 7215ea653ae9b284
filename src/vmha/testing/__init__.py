"""Helpers that start real components (etcd, ...) for tests, benchmarks and the lab."""
