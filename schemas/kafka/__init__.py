"""Kafka I/O shared by both sides (the shared core, not a contract): reading a slice or "until now", watermarks
and the retry policy for transient answers (:mod:`schemas.kafka.reading`), "catch up on a topic, then keep following
it" (:mod:`schemas.kafka.follow`), failing fast when Kafka refuses this process (:mod:`schemas.kafka.access`), and
dead-letter records that always fit the record limits (:mod:`schemas.kafka.dead_letters`)."""
