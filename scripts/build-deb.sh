#!/usr/bin/env bash
# Builds dist/vmha_<version>_<arch>.deb from this checkout (dpkg-deb; no debhelper):
#   /opt/vmha              a private virtualenv of the system's python3 holding vmha and its PyPI
#                          dependencies; Debian's sanlock and libvirt bindings linked into it
#   /usr/bin/vmha          -> /opt/vmha/bin/vmha
#   /etc/vmha/vmha.toml    conffile, docs/example.toml (commented; passes `vmha config check`)
#   /lib/systemd/system/vmha-agent.service, vmha-manager.service; /usr/lib/tmpfiles.d/vmha.conf (/run/vmha)
#   /var/lib/vmha; man pages (scripts/build-man.sh); /usr/share/doc/vmha (the guides)
# Needs network access to PyPI (pip), python3-venv, python3-sanlock, python3-click-man.
#   bash scripts/build-deb.sh            prints the path of the .deb
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
py=/usr/bin/python3  # the system's: the package depends on exactly its minor version
pyver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
version=$("$py" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
arch=$(dpkg --print-architecture)
stage=$here/build/deb/vmha_${version}_${arch}
deb=$here/dist/vmha_${version}_${arch}.deb
rm -rf "$stage" "$here/build/wheel"
mkdir -p "$stage/DEBIAN" "$here/dist"

# 1. The private venv, built where it will live relative to the staging root, then relocated:
# the scripts' #! lines name the staging path until rewritten below.
"$py" -m venv "$stage/opt/vmha"
venv_py=$stage/opt/vmha/bin/python
"$venv_py" -m pip install -q --upgrade pip >/dev/null
"$venv_py" -m pip wheel -q --no-deps -w "$here/build/wheel" "$here" >/dev/null
"$venv_py" -m pip install -q --no-compile "$here"/build/wheel/vmha-*.whl
site=$("$venv_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ext=$("$venv_py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
# Debian's compiled bindings, for the same CPython (python3-sanlock: Depends; python3-libvirt: only
# the libvirt driver and the agent's libvirt check need it, Recommends).
for f in "sanlock$ext" "libvirtmod$ext" libvirt.py; do
  ln -sf "/usr/lib/python3/dist-packages/$f" "$site/$f"
done
"$venv_py" -m pip uninstall -q -y pip >/dev/null  # nothing installs into the package's venv later
grep -rlI --null "$stage" "$stage/opt/vmha/bin" "$stage/opt/vmha/pyvenv.cfg" | xargs -0 -r sed -i "s|$stage||g"
"$venv_py" -m compileall -q -j 0 -s "$stage" -p / "$stage/opt/vmha/lib" >/dev/null || true
if grep -rlI "$stage" "$stage/opt/vmha" | grep -v '/direct_url.json$' | grep -q .; then
  echo "build-deb: the staging path is left in:" >&2
  grep -rlI "$stage" "$stage/opt/vmha" >&2
  exit 1
fi
find "$stage/opt/vmha" -name direct_url.json -delete  # the build machine's wheel path

# 2. Commands, config, units, runtime and state directories, docs, man pages.
install -d "$stage/usr/bin" "$stage/etc/vmha" "$stage/var/lib/vmha" "$stage/lib/systemd/system" \
  "$stage/usr/lib/tmpfiles.d" "$stage/usr/share/doc/vmha" "$stage/usr/share/man/man1"
ln -s /opt/vmha/bin/vmha "$stage/usr/bin/vmha"
install -m 0644 docs/example.toml "$stage/etc/vmha/vmha.toml"
install -m 0644 packaging/systemd/vmha-agent.service packaging/systemd/vmha-manager.service "$stage/lib/systemd/system/"
install -m 0644 packaging/tmpfiles/vmha.conf "$stage/usr/lib/tmpfiles.d/vmha.conf"
for doc in docs/operations.md docs/architecture.md docs/example.toml README.md; do
  [ -f "$doc" ] && install -m 0644 "$doc" "$stage/usr/share/doc/vmha/"
done
PYTHON=$venv_py bash scripts/build-man.sh "$stage/usr/share/man/man1" >/dev/null
gzip -9n "$stage"/usr/share/man/man1/*.1

# 3. The control files.
cat > "$stage/DEBIAN/control" <<CTL
Package: vmha
Version: $version
Architecture: $arch
Maintainer: vmha maintainers <vmha@localhost>
Section: admin
Priority: optional
Installed-Size: $(du -sk "$stage" --exclude=DEBIAN | cut -f1)
Depends: python$pyver, sanlock, python3-sanlock
Recommends: libvirt-sanlock, python3-libvirt, fence-agents, ipmitool
Suggests: etcd-client
Description: VM high availability with per-plane fault awareness and sanlock fence proofs
 vmha keeps virtual machines running when compute hosts or their networks fail, and never runs
 one VM twice: an agent per compute host beats a heartbeat per network plane into etcd, and the
 manager restarts a failed host's VMs elsewhere only after a fence proof (a sanlock lease taken,
 a confirmed power-off). Drivers for OpenStack Nova and plain libvirt/KVM.
CTL
echo /etc/vmha/vmha.toml > "$stage/DEBIAN/conffiles"
cat > "$stage/DEBIAN/postinst" <<'SH'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  systemd-tmpfiles --create /usr/lib/tmpfiles.d/vmha.conf 2>/dev/null || mkdir -p /run/vmha
  # Nothing is enabled or started: a compute node runs vmha-agent, a controller vmha-manager.
  if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
fi
SH
cat > "$stage/DEBIAN/postrm" <<'SH'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
# Nothing is deleted on purge: /var/lib/vmha may hold the lease files on the shared storage
# (locks.path), and /run/vmha a running agent's status; dpkg removes them if empty.
SH
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/postrm"

dpkg-deb --root-owner-group -Zgzip --build "$stage" "$deb" >/dev/null
echo "$deb"
