"""LAB / TEST ONLY: gunicorn entry points for nova-api and placement in the rig, and Keystone
(vmha.lab.nova.keystone).

Nova's, Placement's and Keystone's WSGI modules parse sys.argv with oslo.config and die on gunicorn's own
arguments: clear it before importing them. Used as `gunicorn 'vmha.lab.nova.wsgi:nova_api()'`;
the config directories come from OS_NOVA_CONFIG_DIR / OS_PLACEMENT_CONFIG_DIR /
OS_KEYSTONE_CONFIG_DIR.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


def _load(module: str) -> Any:
    sys.argv = sys.argv[:1]
    return importlib.import_module(module).application


def nova_api() -> Any:
    return _load("nova.wsgi.osapi_compute")


def placement_api() -> Any:
    return _load("placement.wsgi.api")


def keystone_api() -> Any:
    return _load("keystone.wsgi.api")
