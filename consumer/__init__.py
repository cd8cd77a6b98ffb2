"""Queue-facing library of the OIOIOI results path. Imports no Django.

Stages, one module each: :mod:`.config` (settings), :mod:`.transport` (pika, wrapped),
:mod:`.topology` (exchanges and queues), :mod:`.decode` (body to environ), :mod:`.retry`
(database retry policy), :mod:`.policy` (what happens to each message), :mod:`.consumer` (the loop),
:mod:`.publish` (putting results on the queue).
"""
