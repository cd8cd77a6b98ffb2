"""The dead-letter queue's operations, for operators: read a dead letter (:mod:`.letters`), move
the queue into an archive and replay from it (:mod:`.archiving`), pass over the queue itself
(:mod:`.passes`), and say what went wrong with the broker in plain words (:mod:`.diagnose`).
Imports the queue library's public names (``consumer.*``) only, never the shim or the endpoints;
no Django, no pika. Logs as ``consumer.deadletters``.
"""
