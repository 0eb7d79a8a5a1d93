"""The agent's domain layer: libvirt XML from specs (:mod:`.xml`), qcow2 disks (:mod:`.disks`),
lifecycle and media (:mod:`.lifecycle`), and its HTTP routes (:mod:`.routes`)."""
