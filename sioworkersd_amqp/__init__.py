"""sioworkersd's return path to the results queue: a ``twistd`` plugin, installed into
sioworkersd's own environment (``deploy/sioworkersd/install``). Imports no Django.

``twistd sioworkersd-amqp`` starts sioworkersd exactly as ``twistd sioworkersd`` does (same
options, same services), but with a task manager whose return is AMQP-aware: a group whose
``return_url`` is ``amqp:`` is published to the results exchange with the project's publisher
(persistent, ``message_id`` = ``group_id``, mandatory, publisher confirms), and leaves
sioworkersd's task database only once the broker has confirmed it; until then it is retried with
bounded backoff, for ever. Any other ``return_url`` is POSTed by sioworkersd's own code, as today.

Modules: :mod:`.config` (the return-URL rule, the broker settings from sioworkersd's environment
or a file), :mod:`.returns` (publishing on dedicated threads, retries), :mod:`.taskmanager`
(sioworkersd's ``TaskManager`` with that return), :mod:`.logs` (library log records into Twisted's
log, redacted), :mod:`.plugin` (the ``twistd`` service maker).
"""
