"""The lab's shared storage (sanlock leases and VM disks), reached over the storage plane only.

The controller exports a directory with sshd (internal-sftp, key auth) listening on its storage
address alone; each host mounts it with sshfs inside its anchor's mount namespace at MOUNT_POINT.
Cutting a host's storage NIC therefore cuts its leases and disks, and nothing else.

sshfs runs with direct_io (sanlock's O_DIRECT and the lab VM's writes reach the server, no page
cache in between) and ServerAliveInterval=1 / ServerAliveCountMax=3 plus reconnect: without them
a downed link leaves sanlock's renewals hanging for about 170 s instead of failing in a few
seconds. The controller sees the same files through a bind mount at the same path, so every
process of the lab names a lease or disk by one path.
"""

from __future__ import annotations

import time
from pathlib import Path

from vmha.core.planes import Plane
from vmha.lab.net import LabError, Node, kill_pids, pid_alive, run, spawn

MOUNT_POINT = Path("/run/vmha/storage")
SSH_PORT = 22  # the controller's own netns: no clash with the machine's sshd


def _mounted(pid: int, path: Path) -> str | None:
    """The filesystem type mounted at `path` in the mount namespace of `pid`, None when nothing is."""
    try:
        lines = Path(f"/proc/{pid}/mounts").read_text().splitlines()
    except OSError:
        return None
    fstype = None
    for line in lines:
        parts = line.split()
        if len(parts) > 2 and parts[1] == str(path):
            fstype = parts[2]  # the last mount on a path is the visible one
    return fstype


class SharedStorage:
    """Serves `export` (a local directory) from the controller and mounts it on hosts.

    State (keys, sshd config) lives in `state_dir`; logs go to `log_dir`.
    """

    def __init__(self, export: Path, state_dir: Path, log_dir: Path) -> None:
        self.export = export
        self.state_dir = state_dir
        self.log_dir = log_dir
        self.key = state_dir / "ssh" / "id_ed25519"
        self.host_key = state_dir / "ssh" / "host_ed25519"
        self.sshd_config = state_dir / "ssh" / "sshd_config"

    def prepare(self, controller: Node) -> None:
        """Keys and sshd config (kept when present: `lab up` twice reuses them)."""
        self.export.mkdir(parents=True, exist_ok=True)
        self.key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for key in (self.key, self.host_key):
            if not key.exists():
                run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
        auth = self.key.parent / "authorized_keys"
        auth.write_text(self.key.with_suffix(".pub").read_text())
        auth.chmod(0o600)
        self.sshd_config.write_text(
            "\n".join(
                [
                    f"ListenAddress {controller.address(Plane.STORAGE)}:{SSH_PORT}",
                    f"HostKey {self.host_key}",
                    f"AuthorizedKeysFile {auth}",
                    "PidFile none",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "UseDNS no",
                    "Subsystem sftp internal-sftp",
                    # Drops a session whose host vanished (power-off, cut link) within ~4 s.
                    "ClientAliveInterval 1",
                    "ClientAliveCountMax 3",
                    "MaxStartups 200",
                    "MaxSessions 200",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )

    def start_server(self, controller: Node) -> int:
        """sshd in the controller's namespaces, on its storage address; returns its pid once it listens."""
        self.prepare(controller)
        # sshd insists on its privilege separation directory; the controller shares the machine's /run.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        run([*controller.enter(), "mkdir", "-p", str(MOUNT_POINT)])
        if _mounted(controller.anchor, MOUNT_POINT) is None:
            run([*controller.enter(), "mount", "--bind", str(self.export), str(MOUNT_POINT)])
        log = self.log_dir / "sshd.log"
        proc = spawn([*controller.enter(), "/usr/sbin/sshd", "-D", "-e", "-f", str(self.sshd_config)], log)
        addr = controller.address(Plane.STORAGE)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"sshd exited with {proc.returncode}: see {log}")
            ss = run([*controller.enter(), "ss", "-Hltn", f"src {addr}:{SSH_PORT}"], check=False)
            if ss.stdout.strip():
                return proc.pid
            time.sleep(0.05)
        raise LabError(f"sshd did not listen on {addr}:{SSH_PORT} within 10 s: see {log}")

    def mount(self, host: Node, controller_addr: str) -> int:
        """sshfs of the export at MOUNT_POINT in the host's mount namespace; returns the sshfs pid."""
        run([*host.enter(), "mkdir", "-p", str(MOUNT_POINT)])
        if _mounted(host.anchor, MOUNT_POINT) == "fuse.sshfs":
            raise LabError(f"{host.name}: {MOUNT_POINT} is already mounted")
        opts = ",".join(
            [
                f"IdentityFile={self.key}",
                "StrictHostKeyChecking=no",
                "UserKnownHostsFile=/dev/null",
                "BatchMode=yes",
                "LogLevel=ERROR",
                "ConnectTimeout=3",
                "ServerAliveInterval=1",
                "ServerAliveCountMax=3",
                "reconnect",
                "direct_io",
                # No cached file sizes: a VM copy taking over reads its disk's last record from the
                # size it sees, and sshfs's stat cache (20 s) gave a copy a stale end (seq reused).
                "dir_cache=no",
                "attr_timeout=0",
                f"port={SSH_PORT}",
            ]
        )
        log = self.log_dir / f"sshfs-{host.name}.log"
        # -f: stays in the foreground, so the pid we record is the one serving the mount.
        proc = spawn([*host.enter(), "sshfs", "-f", "-o", opts, f"root@{controller_addr}:{self.export}",
                      str(MOUNT_POINT)], log)
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"{host.name}: sshfs exited with {proc.returncode}: see {log}")
            if _mounted(host.anchor, MOUNT_POINT) == "fuse.sshfs":
                return proc.pid
            time.sleep(0.05)
        kill_pids([proc.pid])
        raise LabError(f"{host.name}: sshfs did not mount within 15 s: see {log}")

    def unmount(self, host: Node, sshfs_pid: int) -> None:
        """Lazy unmount (a dead server must not block it), then the sshfs process is stopped."""
        if host.anchor and pid_alive(host.anchor) and _mounted(host.anchor, MOUNT_POINT):
            run([*host.enter(), "umount", "-l", str(MOUNT_POINT)], check=False)
        if sshfs_pid and pid_alive(sshfs_pid):
            kill_pids([sshfs_pid])

    @staticmethod
    def is_mounted(node: Node) -> bool:
        return node.anchor > 0 and _mounted(node.anchor, MOUNT_POINT) is not None
