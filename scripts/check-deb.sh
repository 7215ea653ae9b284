#!/usr/bin/env bash
# CI: build the Debian package, install it with dpkg -i on this machine, and check the installed
# vmha: `vmha --version`, `vmha config check /etc/vmha/vmha.toml`, the installed units verified by
# systemd-analyze. Prints the build time. Leaves the package installed (`dpkg -P vmha` removes it).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s.%N)
deb=$(bash scripts/build-deb.sh | tail -1)
built=$(date +%s.%N)
echo "check-deb: built $deb ($(du -h "$deb" | cut -f1)) in $(awk "BEGIN { printf \"%.0f\", $built - $started }") s"
# dpkg's lock is shared with whatever else installs on this machine: wait for it, a few minutes at most.
for attempt in $(seq 60); do
  if out=$(dpkg -i "$deb" 2>&1); then break; fi
  if ! grep -q "lock" <<<"$out" || [ "$attempt" = 60 ]; then echo "$out" >&2; exit 1; fi
  sleep 5
done
ver=$(/usr/bin/vmha --version)
echo "check-deb: $ver"
grep -q "$(dpkg-deb -f "$deb" Version)" <<<"$ver"
# The shipped config names this node's etcd certificates under /etc/vmha/pki, which an operator
# installs (README, "Security"): without them config check rightly fails. Made here from a throwaway
# CA for the check, and removed after it.
if [ ! -e /etc/vmha/pki ]; then
  trap 'rm -rf /etc/vmha/pki' EXIT
  /opt/vmha/bin/python - <<'PY'
import tomllib
from pathlib import Path
from vmha.lab.pki import Pki
etcd = tomllib.loads(Path("/etc/vmha/vmha.toml").read_text())["etcd"]
pki = Pki(Path(etcd["ca"]).parent)
pki.create_ca()
pki.issue(Path(etcd["cert"]).stem)
PY
fi
/usr/bin/vmha config check /etc/vmha/vmha.toml
# Debian's bindings, linked into the private venv, import there.
/opt/vmha/bin/python -c 'import sanlock, vmha.agent.cli, vmha.manager.daemon'
test -d /run/vmha -a -d /var/lib/vmha
dpkg-query -W -f='${Conffiles}\n' vmha | grep -q /etc/vmha/vmha.toml
if command -v systemd-analyze >/dev/null; then
  # man pages checked too where man is installed (the units' Documentation=man:vmha-agent(1)).
  man=$(command -v man >/dev/null && echo yes || echo no)
  findings=$(systemd-analyze verify --man=$man /lib/systemd/system/vmha-agent.service \
    /lib/systemd/system/vmha-manager.service 2>&1) || { echo "$findings" >&2; exit 1; }
  [ -z "$findings" ] || { echo "check-deb: systemd-analyze verify: $findings" >&2; exit 1; }
fi
echo "check-deb: ok"
