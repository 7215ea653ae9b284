"""Compute drivers: how vmha asks a cloud (Nova) or the lab to move VMs. One interface, base.py."""
