"""The agent's check of its host's libvirt lock settings ([libvirt] in the config), at start.

vmha's fence proofs need every protected VM's lease held by its QEMU process, which on a libvirt
host only libvirt's sanlock lock manager does (a lease no process holds proves nothing, and the
isolation response stops only lease holders). So before the agent protects the host, it reads
  qemu.conf           lock_manager must be "sanlock" (libvirt's default is no lock manager);
  qemu-sanlock.conf   with auto_disk_leases = 1 (libvirt's own leases, named after each disk),
                      disk_lease_dir must be on the shared storage (the filesystem of locks.path)
                      and host_id must be the host_id vmha allocated to this host, or two hosts'
                      leases would not exclude each other; with explicit <lease> elements in the
                      domains (vmha's lockspace), auto_disk_leases = 0 is right.
                      With locks.leases = "libvirt-disk" (vmha.locks.disk_leases: vmha proves with
                      libvirt's disk leases), auto_disk_leases must be 1, disk_lease_dir must be
                      locks.path itself (the lockspace vmha joins) and io_timeout must be set to
                      locks.io_timeout: libvirtd may add the lockspace before the agent, and sanlock
                      keeps whichever io_timeout came first (vmha's renewal and host_dead timings).
A wrong, missing or unreadable setting refuses the host with a message naming the setting and file.

libvirt's configuration format (virconf): `name = value` per line, values a quoted string ("..." or
'...'), an integer, or a list `[ value, ... ]` that may span lines; `#` starts a comment outside
strings. Parsed strictly: anything else is an error naming the file and line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmha.config import LibvirtConfig, LocksConfig

Value = str | int | list[str | int]

# libvirt's defaults when a setting is absent (src/locking/lock_driver_sanlock.c)
DEFAULT_DISK_LEASE_DIR = "/var/lib/libvirt/sanlock"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_INT = re.compile(r"[+-]?[0-9]+")


class LibvirtConfError(Exception):
    """A libvirt configuration file that cannot be read or parsed; str() names the file and line."""


class LockSettingsError(Exception):
    """libvirt's lock settings would leave VM leases unheld or unsafe; str() names setting and file."""


class _Parser:
    def __init__(self, text: str, path: Path) -> None:
        self.text = text
        self.path = path
        self.i = 0

    def line(self) -> int:
        return self.text.count("\n", 0, self.i) + 1

    def rest(self) -> str:
        """What follows on this line (at most 20 characters), for error messages."""
        return self.text[self.i :].split("\n", 1)[0][:20]

    def fail(self, what: str) -> LibvirtConfError:
        return LibvirtConfError(f"{self.path}:{self.line()}: {what}")

    def blanks(self, newlines: bool) -> None:
        """Skips spaces (and newlines and comments when `newlines`; a comment runs to the line's end)."""
        while self.i < len(self.text):
            c = self.text[self.i]
            if c in " \t\r" or (newlines and c == "\n"):
                self.i += 1
            elif c == "#":
                end = self.text.find("\n", self.i)
                self.i = len(self.text) if end < 0 else end
            else:
                return

    def parse(self) -> dict[str, Value]:
        out: dict[str, Value] = {}
        while True:
            self.blanks(newlines=True)
            if self.i >= len(self.text):
                return out
            m = _NAME.match(self.text, self.i)
            if m is None:
                raise self.fail(f"expected a setting name, got {self.rest()!r}")
            name = m.group()
            if name in out:
                raise self.fail(f"{name} is set twice")
            self.i = m.end()
            self.blanks(newlines=False)
            if not self.text.startswith("=", self.i):
                raise self.fail(f"expected '=' after {name}")
            self.i += 1
            self.blanks(newlines=False)
            out[name] = self.value(name, in_list=False)
            self.blanks(newlines=False)
            if self.text.startswith(";", self.i):
                self.i += 1
                self.blanks(newlines=False)
            if self.i < len(self.text) and self.text[self.i] != "\n":
                raise self.fail(f"unexpected {self.rest()!r} after the value of {name}")

    def value(self, name: str, *, in_list: bool) -> Value:
        c = self.text[self.i : self.i + 1]
        if c in ('"', "'"):
            end = self.text.find(c, self.i + 1)
            nl = self.text.find("\n", self.i + 1)
            if end < 0 or (0 <= nl < end):
                raise self.fail(f"{name}: string not closed on its line")
            s = self.text[self.i + 1 : end]
            self.i = end + 1
            return s
        if c == "[" and not in_list:
            self.i += 1
            items: list[str | int] = []
            while True:
                self.blanks(newlines=True)
                if self.text.startswith("]", self.i):
                    self.i += 1
                    return items
                item = self.value(name, in_list=True)
                assert not isinstance(item, list)
                items.append(item)
                self.blanks(newlines=True)
                if self.text.startswith(",", self.i):
                    self.i += 1
                elif not self.text.startswith("]", self.i):
                    raise self.fail(f"{name}: expected ',' or ']' in the list")
        m = _INT.match(self.text, self.i)
        if m is None:
            raise self.fail(f"{name}: expected a quoted string, an integer or a list, got {self.rest()!r}")
        self.i = m.end()
        return int(m.group())


def parse_conf(text: str, path: Path) -> dict[str, Value]:
    """The settings of a libvirt configuration file; LibvirtConfError naming file and line if malformed."""
    return _Parser(text, path).parse()


def read_conf(path: Path) -> dict[str, Value] | None:
    """The settings of the file, None if it does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise LibvirtConfError(f"{path}: cannot read it: {e}") from None
    return parse_conf(text, path)


def _get(conf: dict[str, Value], name: str, kind: type, path: Path) -> object:
    v = conf.get(name)
    if v is not None and not isinstance(v, kind):
        want = "a quoted string" if kind is str else "an integer"
        raise LockSettingsError(f"{path}: {name} must be {want}, got {v!r}")
    return v


@dataclass(frozen=True, slots=True)
class LockSettings:
    """What the check found (for the agent's log line)."""

    lock_manager: str
    auto_disk_leases: bool
    text: str


def check_lock_settings(cfg: LibvirtConfig, locks: LocksConfig, host_id: int) -> LockSettings | None:
    """The host's libvirt lock settings, if right for vmha; LockSettingsError (or LibvirtConfError) naming
    the setting and file if not. None when libvirt is not configured on this host (no qemu.conf) and
    cfg.required is false."""
    qemu_conf = cfg.config_dir / "qemu.conf"
    qemu = read_conf(qemu_conf)
    if qemu is None:
        if cfg.required:
            raise LockSettingsError(f"{qemu_conf} does not exist: libvirt's QEMU driver is not configured "
                                    "here (libvirt.config_dir), and [libvirt] required = true")
        return None
    manager = _get(qemu, "lock_manager", str, qemu_conf)
    if manager != "sanlock":
        got = "not set (libvirt's default: no lock manager)" if manager is None else f"{manager!r}"
        raise LockSettingsError(f'{qemu_conf}: lock_manager must be "sanlock", it is {got}: QEMU would run '
                                "without holding its VM lease, and no fence proof would be evidence")
    sanlock_conf = cfg.config_dir / "qemu-sanlock.conf"
    conf = read_conf(sanlock_conf) or {}
    auto = _get(conf, "auto_disk_leases", int, sanlock_conf)
    disk_mode = locks.leases == "libvirt-disk"
    if not auto and disk_mode:
        raise LockSettingsError(f"{sanlock_conf}: auto_disk_leases must be 1 with vmha's locks.leases = "
                                '"libvirt-disk": libvirt would take no disk lease, and QEMU would run without '
                                "the lease vmha's proofs rely on")
    if not auto:
        return LockSettings("sanlock", False, f"{qemu_conf}: lock_manager=sanlock; {sanlock_conf}: "
                            "auto_disk_leases=0 (explicit <lease> elements)")
    lease_dir = Path(str(_get(conf, "disk_lease_dir", str, sanlock_conf) or DEFAULT_DISK_LEASE_DIR))
    if disk_mode:
        _check_disk_lockspace(sanlock_conf, conf, lease_dir, locks)
    if not _compare(sanlock_conf, lease_dir, locks.path, lambda a, b: os.stat(a).st_dev == os.stat(b).st_dev):
        raise LockSettingsError(f"{sanlock_conf}: disk_lease_dir {lease_dir} is not on the shared storage of "
                                f"locks.path {locks.path} (another filesystem): libvirt's disk leases would "
                                "exclude nothing across hosts")
    libvirt_id = _get(conf, "host_id", int, sanlock_conf)
    if libvirt_id != host_id:
        raise LockSettingsError(f"{sanlock_conf}: host_id is {libvirt_id if libvirt_id is not None else 'not set'}"
                                f", vmha allocated host_id {host_id} to this host: set host_id = {host_id}")
    mode = f"io_timeout={locks.io_timeout}, vmha's lockspace" if disk_mode else "shared"
    return LockSettings("sanlock", True, f"{qemu_conf}: lock_manager=sanlock; {sanlock_conf}: auto_disk_leases=1, "
                        f"disk_lease_dir={lease_dir} ({mode}), host_id={host_id}")


def _check_disk_lockspace(sanlock_conf: Path, conf: dict[str, Value], lease_dir: Path, locks: LocksConfig) -> None:
    """With locks.leases = "libvirt-disk" libvirt's disk-lease lockspace is vmha's: the same directory, and
    the io_timeout vmha's timings assume."""
    if not _compare(sanlock_conf, lease_dir, locks.path, os.path.samefile):
        raise LockSettingsError(f'{sanlock_conf}: disk_lease_dir is {lease_dir}, with locks.leases = "libvirt-disk" '
                                f"it must be locks.path {locks.path}: vmha would prove with other leases than "
                                "the ones QEMU holds")
    io = _get(conf, "io_timeout", int, sanlock_conf)
    if io != locks.io_timeout:
        got = "not set (sanlock's default)" if not io else f"{io}"
        raise LockSettingsError(f"{sanlock_conf}: io_timeout is {got}, vmha's locks.io_timeout is {locks.io_timeout}: "
                                f"set io_timeout = {locks.io_timeout} (libvirtd may add the lockspace first, and "
                                "sanlock keeps its io_timeout)")


def _compare(sanlock_conf: Path, lease_dir: Path, locks_path: Path, same: Callable[[Path, Path], bool]) -> bool:
    """same(disk_lease_dir, locks.path); LockSettingsError naming both if either cannot be read."""
    try:
        return same(lease_dir, locks_path)
    except OSError as e:
        raise LockSettingsError(f"{sanlock_conf}: disk_lease_dir {lease_dir} cannot be checked against "
                                f"locks.path {locks_path}: {e}") from None
