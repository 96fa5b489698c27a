"""What every tier3 command needs around its work, shared by both sides (the shared core, not a contract): the
checks before it starts and the one line a user's mistake gets (:mod:`schemas.runtime.preflight`), secrets out of
every text it shows (:mod:`schemas.runtime.redaction`), putting files into place atomically
(:mod:`schemas.runtime.files`) and the one percentile (:mod:`schemas.runtime.stats`)."""
