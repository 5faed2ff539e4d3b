"""The wire contract (coldswarm.proto) and its generated stubs. No logic lives here."""
