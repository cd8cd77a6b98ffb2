"""The legacy HTTP shim: sioworkersd's result POSTs, each published to the results queue.

:mod:`.form` reads the POST's ``data`` field; :mod:`.server` answers, publishes with confirms and
bounds its threads. Imports the queue library's public names (``consumer.*``) only, never the
dead-letter tools or the endpoints; no Django. Logs as ``consumer.shim``.
"""
