"""What the libvirt driver reports for a recorded protected domain not recorded running in a scan
(drivers.libvirt.domain_state): stopped only on evidence, an answering host without it."""

from __future__ import annotations

import pytest

from vmha.core.desired import STOPPED
from vmha.drivers.libvirt import domain_state

XML = "<domain/>"


@pytest.mark.parametrize(
    ("scan", "state"),
    [
        ({"h1": {}, "h2": {}}, STOPPED),  # its host answered with no domain at all
        ({"h1": {"other": XML}, "h2": None}, STOPPED),  # answered, runs others; h2's silence proves nothing
        ({"h1": None, "h2": {}}, "unknown"),  # its host could not be asked: no evidence
        ({"h2": {}}, "unknown"),  # its host is no longer in [libvirt.hosts]
        ({"h1": {}, "h2": {"vm1": XML}}, "unknown"),  # runs elsewhere, its definition was not recorded
        ({"h1": {"vm1": XML}}, "unknown"),  # runs on its host, its definition was not recorded
    ],
)
def test_stopped_only_when_its_host_answered_without_it(scan: dict[str, dict[str, str] | None], state: str) -> None:
    assert domain_state("vm1", "h1", scan) == state
