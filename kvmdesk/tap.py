"""twistd entry points: ``twistd -n kvmdesk`` (the controller).  The agent's is added by the agent."""
from __future__ import annotations

from typing import Any, Optional

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.internet.error import CannotListenError
from twisted.python import usage

from kvmdesk.api.streaming import make_site
from kvmdesk.core.config import Config, ConfigError, command_line_layers
from kvmdesk.core.filemodes import private_umask
from kvmdesk.core.process import exit_after_shutdown, listen_failure_line

log = Logger(namespace="kvmdesk.tap")


class Options(usage.Options):
    """Command-line options of ``twistd kvmdesk``; each overrides the configuration file."""

    optParameters = [
        ["config", "c", None, "TOML configuration file (see kvmdesk/config/defaults.toml)"],
        ["listen", "l", None, "address the API listens on [default: 127.0.0.1]"],
        ["port", "p", None, "TCP port of the API [default: 50004]", int],
        ["data-dir", "d", None, "directory for the embedded store and uploads [default: ./kvmdesk-data]"],
        ["mongo-uri", "m", None, "use MongoDB at this URI instead of the embedded store"],
    ]

    def postOptions(self) -> None:
        try:
            layers = command_line_layers(self, {"listen": "controller.listen", "port": "controller.port",
                                                "data-dir": "controller.data_dir", "mongo-uri": "store.uri"})
        except ConfigError as exc:
            raise usage.UsageError(str(exc)) from None
        self.config = Config(layers)


class ControllerService(service.MultiService):
    """Builds the core asynchronously, then listens; stops listeners, services and the store in order."""

    def __init__(self, config: Config, reactor: Any = None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.core: Optional[Any] = None
        self.port: Optional[Any] = None
        self.ready: defer.Deferred = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        defer.ensureDeferred(self._start()).addCallbacks(self.ready.callback, self._failed)

    async def _start(self) -> Any:
        from kvmdesk.api.app import make_router
        from kvmdesk.core.app import build_core, freeze_startup_heap

        rotate_bytes = int(self.config.number("controller.access_log_rotate_mb", 10, minimum=0.01) * 1e6)
        keep = int(self.config.number("controller.access_log_keep", 9))
        self.core = await build_core(self.config, self.reactor, make_router=make_router)
        # A part the controller cannot run without (its in-process agent's port) ends the process.
        self.core.extensions["fatal"] = self.fatal
        freeze_startup_heap()
        self.core.services.setServiceParent(self)
        # The API's site streams upload bodies to their endpoints instead of buffering them whole.
        access_log = self.config.get("controller.access_log", "access.log")
        if access_log and access_log != "-":
            access_log = str(self.core.data_dir / access_log)
        site = make_site(self.core.router, access_log=access_log, rotate_bytes=rotate_bytes, keep=keep)
        listen = self.config.get("controller.listen")
        self.port = self.reactor.listenTCP(int(self.config.get("controller.port")), site, interface=listen)
        address = self.port.getHost()
        log.info("kvmdesk controller listening on http://{host}:{port}/api/v1.0/", host=address.host, port=address.port)
        return self.core

    def _failed(self, failure: Any) -> None:
        from kvmdesk.core.store import StoreError

        if failure.check(CannotListenError):
            error = failure.value
            log.critical("{line}", line=listen_failure_line("kvmdesk controller", error.interface, error.port, error))
        elif failure.check(StoreError, ConfigError, OSError):
            log.critical("kvmdesk controller cannot start: {reason}", reason=str(failure.value))
        else:
            log.failure("kvmdesk controller failed to start", failure)
        self.ready.errback(failure)
        self.fatal()

    def fatal(self) -> None:
        """End the process with status 1 (start-up failed, or a part it cannot run without did)."""
        exit_after_shutdown(self.reactor, 1)

    def stopService(self) -> defer.Deferred:
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self.port is not None:
            await self.port.stopListening()
        await defer.maybeDeferred(super().stopService)
        if self.core is not None:
            await self.core.store.close()


def makeService(options: Options) -> service.IService:
    """twistd's hook: the controller service for the parsed options (files it creates are private)."""
    private_umask()
    return ControllerService(options.config)
