"""Everything that talks to etcd (through aetcd) lives in this package, and only here."""
