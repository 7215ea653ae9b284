"""vmha: keeps VMs running when compute hosts or their networks fail, and never runs one VM twice."""

__version__ = "0.1.0"
