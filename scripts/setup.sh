#!/usr/bin/env bash
# Installs everything vmha, its lab and its tests need on Debian 12, as root:
# Debian packages (etcd, sanlock and its Python binding, sshfs/sshd for the lab's shared storage,
# gcc for the lab's setrlimit shim, fence-agents + ipmitool for the power fence and openipmi's ipmi_sim
# as the BMC its tests fence; libvirt with its sanlock lock manager, QEMU, and the kernel source and
# tools the lab guest's kernel is compiled with; spin, whose verifiers gcc compiles, for `vmha model
# check`; systemd for `systemd-analyze verify` of the units, click-man for the man pages; prometheus,
# which the metrics test runs as its own process, no service) and a virtualenv in .venv with vmha
# installed in it.
# Idempotent: a second run only checks.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

apt_pkgs=(etcd-server etcd-client sanlock python3-sanlock sshfs fuse3 openssh-server openssh-client
          iproute2 procps psmisc gcc libc6-dev python3-venv python3-dev fence-agents ipmitool openipmi
          libvirt-daemon libvirt-daemon-driver-qemu libvirt-sanlock libvirt-clients python3-libvirt
          qemu-system-x86 cpio binutils spin systemd python3-click-man prometheus
          libvirt-dev pkg-config  # the libvirt binding for other Pythons (test-pythons.sh)
          linux-source-6.1 xz-utils make bc flex bison libelf-dev  # the lab guest's kernel (build-guest.sh)
          chromium chromium-driver)  # chromium: the dashboard test (tests/e2e/test_lab_dashboard.py)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian packages start nothing here (no systemd); if an init script did start etcd or sshd,
# vmha does not use them: the lab and the tests start their own, on their own addresses.

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[test]"

# The sanlock and libvirt bindings are compiled modules in Debian's dist-packages, built for the
# system's Python (3.11 on Debian 12, 3.12 on Ubuntu 24.04, 3.13 on Debian 13); they import into a
# venv of the same CPython version. Link those files alone into the venv instead of exposing all of
# dist-packages.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ext=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
for want in "sanlock$ext" "libvirtmod$ext" libvirt.py; do
  f=$(ls /usr/lib/python3/dist-packages/$want 2>/dev/null | head -1)
  if [ -z "$f" ]; then
    echo "setup: /usr/lib/python3/dist-packages/$want is missing (python3-sanlock, python3-libvirt for" \
         "$("$py" --version); the venv's Python must be the system's)" >&2
    exit 1
  fi
  ln -sf "$f" "$site/$(basename "$f")"
done
.venv/bin/python -c 'import sanlock, libvirt, aetcd, vmha' || { echo "setup: import check failed" >&2; exit 1; }
# libvirtd needs its QEMU user to exist (the Debian package that creates it needs systemd).
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd --system --gid libvirt-qemu --no-create-home \
  --home-dir /var/lib/libvirt --shell /usr/sbin/nologin libvirt-qemu
# The lab's QEMU guest (vmha lab up --guests qemu): its kernel and vmha's disk writer as init.
bash scripts/build-guest.sh
echo "setup: ready (.venv/bin/vmha)"
