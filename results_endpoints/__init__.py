"""The HTTP endpoints an orchestrator and Prometheus read: ``/healthz``, ``/readyz``, ``/metrics``.

:mod:`.metrics` counts what a process's :class:`consumer.observe.Observer` is told; :mod:`.health`
serves it from a thread of its own. Imports the queue library's public names (``consumer.*``)
only, never the shim or the dead-letter tools; no Django. Logs as ``consumer.health``.
"""
