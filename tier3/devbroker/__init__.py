"""The development broker: a local single-node Apache Kafka (KRaft) for development, tests, benchmarks and the
demo, no Docker (``tier3 broker up|down|status|principal``). Not part of the pipeline: production points
``KAFKA_BOOTSTRAP_SERVERS`` at its own cluster.

- :mod:`tier3.devbroker.server`: its settings, start (plain or secured), stop, status, :func:`ensure_running`;
- :mod:`tier3.devbroker.acls`: on the secured broker, one principal per service with only the ACLs of the table;
- :mod:`tier3.devbroker.commands`: the ``tier3 broker`` commands.
"""
