"""LAB / TEST ONLY: a real Nova control plane on one machine (the Nova test rig).

MariaDB and RabbitMQ from Debian, Nova and Placement from the venv that scripts/setup-nova.sh
installs (/opt/vmha-nova), all on loopback, started and stopped by PID (rig.NovaRig).

The modules auth, virt, wsgi, compute and stubs run *inside the rig's processes* (the Nova venv,
with vmha's src on PYTHONPATH): they import Nova, paste and webob, which vmha proper never does.
Only rig.py and faults.py (the API fault proxy) run in vmha's own venv, and import the standard library only.
"""
