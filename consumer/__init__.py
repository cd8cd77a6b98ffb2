"""Queue-facing library of the OIOIOI results path. Imports no Django.

Stages, one module each: :mod:`.config` (settings), :mod:`.transport` (pika, wrapped),
:mod:`.topology` (exchanges and queues), :mod:`.decode` (body to environ), :mod:`.retry`
(database retry policy), :mod:`.policy` (what happens to each message), :mod:`.loop` (the
consume loop),
:mod:`.publish` (putting results on the queue). Only :mod:`.transport` imports pika.

The programs built on it live beside it, each importing only this package's public names:
``results_shim`` (the HTTP shim), ``results_dead_letters`` (the dead-letter queue's operations)
and ``results_endpoints`` (health and metrics).
"""
