"""The storage plugin's configuration (section ``[storage]``) and where its files live."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

DEFAULTS = {
    "storage": {
        # Where uploaded base images and ISOs are kept on the controller; empty: <data_dir>/base_images
        # and <data_dir>/isos.  Uploads are written to a temporary file in the same directory and
        # renamed into place once checked.
        "base_image_dir": "",
        "iso_dir": "",
        # Largest file accepted by an upload, in bytes (the form may add up to 1 MiB around it).
        "max_upload": 200 * (1 << 30),
        # Write and MD5-hash upload chunks on a worker thread, off the reactor (false: inline on the
        # reactor thread; kvmdesk/core/filewriter.py and bench/transfer_bench.py measure both).
        "hash_in_thread": True,
        # fsync an uploaded file before it is checked, renamed into place and recorded: a power cut
        # never leaves a recorded image whose last gigabytes were still in the page cache.
        "fsync": True,
        # Write uploads, and read images to send them to nodes, with O_DIRECT, past the page cache: an
        # image of many gigabytes would push out everything else the controller keeps cached (the store
        # among it), and filling fresh cache pages costs more CPU than the copy itself (see
        # kvmdesk/core/directio.py for the figures).  false: through the page cache, which pays off when
        # images are small next to RAM (each is then sent to the nodes from memory).  Filesystems
        # without direct I/O are read and written through the page cache whatever this says.
        "direct_io": True,
        # Transfers to nodes: streams at once over the whole controller, chunk size read from disk.
        "max_streams": 2,
        "chunk_size": 1 << 20,
        # A failed transfer is retried after retry_initial seconds, doubling up to retry_max; after
        # retry_limit attempts (0: never) it stays failed until a resync or the node comes back online.
        "retry_initial": 5.0,
        "retry_max": 300.0,
        "retry_limit": 0,
        # Seconds between checks that every node of a pool has every image of the pool.
        "reconcile_interval": 60.0,
        # A transfer that sends nothing for this many seconds is cut and retried.
        "stall_timeout": 300.0,
        # Seconds for a non-streamed call to an agent.
        "agent_timeout": 30.0,
        # Bearer token for the direct agent link (used only until the nodes plugin's client is wired in).
        "agent_token": "",
        # The qemu-img program that checks uploaded base images.
        "qemu_img": "qemu-img",
    }
}


@attrs.frozen
class StorageSettings:
    base_image_dir: Path
    iso_dir: Path
    max_upload: int
    hash_in_thread: bool
    qemu_img: str
    fsync: bool = True
    direct_io: bool = True

    @classmethod
    def from_core(cls, core: Any) -> "StorageSettings":
        config = core.config

        def directory(key: str, default: str) -> Path:
            configured = config.get(f"storage.{key}") or ""
            return Path(configured).absolute() if configured else core.data_dir / default

        return cls(
            base_image_dir=directory("base_image_dir", "base_images"),
            iso_dir=directory("iso_dir", "isos"),
            max_upload=int(config.get("storage.max_upload")),
            hash_in_thread=bool(config.get("storage.hash_in_thread")),
            qemu_img=str(config.get("storage.qemu_img") or "qemu-img"),
            fsync=bool(config.get("storage.fsync", True)),
            direct_io=bool(config.get("storage.direct_io", True)),
        )


def settings(core: Any) -> StorageSettings:
    """The settings of this core (computed once)."""
    found = core.extensions.get("storage.settings")
    if found is None:
        found = core.extensions["storage.settings"] = StorageSettings.from_core(core)
    return found


def distributor(core: Any) -> Any:
    """The core's :class:`~kvmdesk.plugins.storage.distribution.Distributor`."""
    return core.extensions["storage.distributor"]


def size_in_gb(size: int) -> float:
    return round(size / (1 << 30), 2)
