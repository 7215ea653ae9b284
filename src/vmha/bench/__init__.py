"""Benchmarks: commands that measure and print numbers (never pass/fail)."""
