"""``twistd sioworkersd-amqp``: sioworkersd with the return to the results queue.

The options are ``twistd sioworkersd``'s (sioworkers' ``ServerOptions``: ports, database,
scheduler, ...) plus the return path's three; the services are the ones upstream's
``ServerServiceMaker.makeService`` builds (sioworkers 1.5.9), the task manager being
:class:`~sioworkersd_amqp.taskmanager.QueueTaskManager`. The broker settings are read here, once,
from sioworkersd's environment and ``--amqp-env-file``; a bad one stops ``twistd`` with a usage
error before anything listens.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from sio.sioworkersd import siorpc
from sio.sioworkersd.workermanager import WorkerManager
from twisted.application import internet, service
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.plugins.sioworkers_plugin import ServerOptions
from twisted.python import usage
from zope.interface import implementer

from consumer.redact import Redactor
from consumer.transport import connection_parameters
from sioworkersd_amqp import logs
from sioworkersd_amqp.config import ConfigError, ReturnConfig, broker_settings, readable_by_others
from sioworkersd_amqp.returns import QueueReturns
from sioworkersd_amqp.taskmanager import QueueTaskManager

log = Logger()

TAPNAME = "sioworkersd-amqp"


class Options(ServerOptions):  # type: ignore[misc]
    """``twistd sioworkersd``'s options, and the return path's."""

    optParameters = [
        [
            "amqp-env-file",
            None,
            None,
            "file of KEY=VALUE lines (AMQP_URL, RESULTS_EXCHANGE, ...) overriding the "
            "environment's; keep it readable by sioworkersd's user only",
        ],
        ["amqp-connections", None, 4, "broker connections publishing results at once", int],
        [
            "amqp-retry-max",
            None,
            30.0,
            "longest wait in seconds between two attempts to publish a result",
            float,
        ],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        retry_max = self["amqp-retry-max"]
        try:
            config = ReturnConfig(
                broker=broker_settings(os.environ, self["amqp-env-file"]),
                connections=self["amqp-connections"],
                retry_initial=min(0.5, retry_max),
                retry_max=retry_max,
            )
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        try:
            connection_parameters(config.broker)  # a URL pika cannot parse fails now
        except ValueError as e:
            redact = Redactor([config.broker.amqp_url])
            raise usage.UsageError(f"AMQP_URL is not valid: {redact(str(e))}") from None
        self["amqp"] = config


@implementer(service.IServiceMaker, IPlugin)
class ServiceMaker:
    tapname = TAPNAME
    description = "sioworkersd, publishing results to the OIOIOI results queue (return URL amqp:)"
    options = Options

    def makeService(self, options: Any) -> Any:
        config: ReturnConfig = options["amqp"]
        logs.bridge(Redactor([config.broker.amqp_url]))
        env_file = options["amqp-env-file"]
        if env_file and readable_by_others(env_file):
            log.warn(
                "{path} can be read by every user of this machine, and it may hold the broker's "
                "password: chmod 0600 it.",
                path=env_file,
            )

        # From here on, upstream's ServerServiceMaker.makeService, with the task manager ours.
        workerm = WorkerManager()
        module_name, class_name = options["scheduler"].rsplit(".", 1)
        scheduler_class = getattr(importlib.import_module(module_name), class_name)
        taskm = QueueTaskManager(
            options["database"],
            workerm,
            scheduler_class(workerm),
            options["max-task-ram"],
            QueueReturns(config),
        )
        taskm.setServiceParent(workerm)
        internet.TCPServer(
            int(options["rpc-port"]),
            siorpc.makeSite(workerm, taskm),
            interface=options["rpc-listen"],
        ).setServiceParent(workerm)
        internet.TCPServer(
            int(options["worker-port"]),
            workerm.makeFactory(),
            interface=options["worker-listen"],
        ).setServiceParent(workerm)
        return workerm


serviceMaker = ServiceMaker()
