#!/usr/bin/env bash
# Installs the Nova test rig on Debian 12, as root: MariaDB and RabbitMQ from Debian, and a venv of
# its own (default /opt/vmha-nova, override with VMHA_NOVA_VENV) holding pinned Nova and Placement
# from PyPI, served by gunicorn, and pinned Masakari (API and engine, for `vmha bench nova --masakari`;
# in the same venv: its requirements only add packages to Nova's set, none changes version). vmha
# itself never imports Nova or Masakari: only the rig's processes run from this venv
# (vmha.lab.nova.rig and vmha.lab.nova.masakari start and stop them). Keystone 30 (the 2026.2 series,
# Nova 34's; it too only adds packages) is there for the API's Keystone-token tests
# (tests/integration/test_api_keystone.py), which run it under gunicorn on loopback with sqlite.
# Idempotent: a second run only checks.
set -euo pipefail
venv=${VMHA_NOVA_VENV:-/opt/vmha-nova}
py=${PYTHON:-python3}
pins=(nova==34.0.0 openstack-placement==16.0.0 masakari==22.0.0 keystone==30.0.0 gunicorn==27.0.1 pymysql==1.2.4)

apt_pkgs=(mariadb-server mariadb-client rabbitmq-server)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-nova: installing Debian packages: ${missing[*]}"
  # Without systemd the packages' init scripts would start a system MariaDB and RabbitMQ that
  # the rig does not use (it starts its own on loopback): forbid service starts while installing.
  added_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    added_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
want=$(printf '%s\n' "${pins[@]}" | sort)
have=$("$venv/bin/python" -m pip freeze 2>/dev/null | grep -i -E '^(nova|openstack-placement|masakari|keystone|gunicorn|pymysql)==' \
       | tr 'A-Z' 'a-z' | sort || true)
if [ "$(echo "$want" | tr 'A-Z' 'a-z')" != "$have" ]; then
  echo "setup-nova: installing ${pins[*]} into $venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$venv/bin/python" -m pip install -q "${pins[@]}"
fi
# Nova, Masakari and Keystone register oslo options of the same names: each is checked in a process of its own.
for mods in 'nova.virt.fake, placement.wsgi, pymysql, gunicorn' 'masakari.engine.manager' 'keystone.server.wsgi'; do
  "$venv/bin/python" -c "import $mods" || { echo "setup-nova: import check failed in $venv ($mods)" >&2; exit 1; }
done
for b in nova-manage nova-conductor nova-scheduler nova-compute placement-manage masakari-api masakari-engine \
         masakari-manage keystone-manage gunicorn; do
  [ -x "$venv/bin/$b" ] || { echo "setup-nova: $venv/bin/$b is missing" >&2; exit 1; }
done
command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || { echo "setup-nova: mariadbd missing" >&2; exit 1; }
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || [ -x /usr/sbin/rabbitmq-server ] \
  || { echo "setup-nova: rabbitmq-server missing" >&2; exit 1; }
echo "setup-nova: ready ($venv)"
