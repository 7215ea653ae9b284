"""LAB / TEST ONLY: `python -m vmha.lab.nova.compute --config-file ...` runs nova-compute with the
rig's virt driver (compute_driver = vmha_lab.LabFakeDriver)."""

from __future__ import annotations

import importlib
import sys


def main() -> None:
    # nova.cmd.compute patches the threading backend on import: import it before any Nova module.
    cmd = importlib.import_module("nova.cmd.compute")
    sys.modules["nova.virt.vmha_lab"] = importlib.import_module("vmha.lab.nova.virt")
    cmd.main()


if __name__ == "__main__":
    main()
