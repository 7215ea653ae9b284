"""Without the sanlock binding, vmha still imports, and the first sanlock call names what is missing."""

from __future__ import annotations

import sys

import pytest

from vmha.locks.binding import BindingMissing, _Missing


def test_missing_binding_names_the_python_and_the_package() -> None:
    stand_in = _Missing(ImportError("No module named 'sanlock'"))
    with pytest.raises(BindingMissing) as e:
        stand_in.inquire(slkfd=3)
    text = str(e.value)
    assert "sanlock.inquire" in text
    assert f"Python {sys.version_info[0]}.{sys.version_info[1]}" in text
    assert "python3-sanlock" in text
    assert isinstance(e.value.__cause__, ImportError)
