"""A simulated cluster on a fake clock (Proxmox's Sim/TestEnv): agents, etcd leases, a scripted
world, and the real HealthCore and RecoveryCore. Used by the scenario tests and the core benchmark."""
