"""The fencing protocol as a checked model: fencing.pml (Promela) and its checks with Spin (check.py)."""
