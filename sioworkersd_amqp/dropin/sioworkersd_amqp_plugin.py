"""twistd's drop-in for ``twistd sioworkersd-amqp``; installed as ``twisted/plugins/`` of
sioworkersd's environment by ``deploy/sioworkersd/install`` (see :mod:`sioworkersd_amqp`)."""

from sioworkersd_amqp.plugin import serviceMaker  # noqa: F401  (what twistd looks for)
