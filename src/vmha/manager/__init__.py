"""The manager: detection, decisions and recovery across the cluster."""
