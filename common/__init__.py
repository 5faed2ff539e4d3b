"""What both roles speak, below them both: ``coordinator/`` and ``worker/`` import it, it imports neither.

It imports only the standard library, grpc and :mod:`coldswarm.proto` (never a role, torch, numpy or
hivemind; ``tests/test_import_boundaries.py`` checks), so ``fusion/`` and ``lm/`` may use its
standard-library pieces too. One module per job:

==================  =========================================================================
module              what it holds
==================  =========================================================================
``channel``         the gRPC channel to a coordinator (options, TLS) and bearer metadata
``rpc_errors``      which status codes mean "the coordinator is away" (retry) and error text
``fetch``           resumable, sha256-checked download of a version's files
``manifest``        the version manifest's file name, the evaluator's protocol entry
``hashing``         sha256 of files (whole or a prefix)
``durable``         fsync of files and directories, atomic writes (also owner-only, 0600)
``signals``         stop-signal handlers that forked children do not inherit
``options``         options mappings -> typed dataclasses, refusing unknown keys ("did you mean")
``cli_args``        typed config dataclasses -> argparse flags, help per field
``round_options``   the round-options schema: fusion hyperparameters, pretrain data options, checks
==================  =========================================================================
"""
