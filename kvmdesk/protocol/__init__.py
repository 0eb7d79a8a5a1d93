"""What the controller and a node agent both speak: the only kvmdesk modules the two sides share.

Besides the HTTP framework both are built on (:mod:`kvmdesk.api`, :mod:`kvmdesk.core`), the controller
and the agent meet only here: the image transfer protocol (:mod:`~kvmdesk.protocol.images`), the
storage roles and file checksums (:mod:`~kvmdesk.protocol.storage`) and the host facts the agent
reports (:mod:`~kvmdesk.protocol.hostfacts`), and the domain specs the agent turns into libvirt domains
(:mod:`~kvmdesk.protocol.domains`).  Modules here import nothing of kvmdesk but the error
catalogue, so both sides can use them without pulling in the other.
"""
