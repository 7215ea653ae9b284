"""The lab: several vmha hosts on one machine in network namespaces (test and demo only)."""
