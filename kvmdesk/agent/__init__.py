"""The node agent: host probes, metrics, the libvirt driver and the node's systemd services.

Everything here that blocks (psutil, /proc, /sys, libvirt) is either a plain function meant to run in
a thread, or runs its own thread pool and hands back Deferreds.
"""
