#!/usr/bin/env bash
# Installs everything vmha, its lab and its tests need on Debian 12, as root:
# Debian packages (etcd, sanlock and its Python binding, sshfs/sshd for the lab's shared storage,
# gcc for the lab's setrlimit shim, fence-agents + ipmitool for the power fence and openipmi's ipmi_sim
# as the BMC its tests fence) and a virtualenv in .venv with vmha installed in it.
# Idempotent: a second run only checks.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

apt_pkgs=(etcd-server etcd-client sanlock python3-sanlock sshfs fuse3 openssh-server openssh-client
          iproute2 procps psmisc gcc libc6-dev python3-venv python3-dev fence-agents ipmitool openipmi)
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

# The sanlock binding is one compiled module in Debian's dist-packages; it imports into any
# CPython 3.11. Link that file alone into the venv instead of exposing all of dist-packages.
so=$(ls /usr/lib/python3/dist-packages/sanlock.cpython-311-*.so 2>/dev/null | head -1)
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -z "$so" ]; then
  echo "setup: python3-sanlock is installed but its module for CPython 3.11 is missing" >&2
  exit 1
fi
ln -sf "$so" "$site/$(basename "$so")"
.venv/bin/python -c 'import sanlock, aetcd, vmha' || { echo "setup: import check failed" >&2; exit 1; }
echo "setup: ready (.venv/bin/vmha)"
