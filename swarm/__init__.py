"""The hivemind protocol both roles speak: the worker's trainer and the coordinator's checkpointer.

Both sides of a pretrain round meet on one hivemind DHT and must agree on its records, on which tensors
are averaged in what order, and on how tensors are compressed. That agreement lives here, below both
roles (it imports neither; ``tests/test_import_boundaries.py`` checks):

=====================  ======================================================================
module                 what it holds
=====================  ======================================================================
``records``            the DHT keys of a run and their typed, signed records (pydantic schemas
                       and writers' signatures every peer checks, as hivemind checks its progress)
``credentials``        the coordinator-signed credential admitting one peer identity to one run
``authorizer``         hivemind's token authorizer on the DHT, with the coordinator as authority
``admission``          the averagers' lookup of whether a caller is admitted to the run
``robust``             the guarded all-reduce: finite parts only, CenteredClip, screened results
``guarded_averagers``  hivemind's averagers with admission, robust all-reduce, checked downloads
``security``           what one peer brings (identity, authority, credential) and builds from it
``parameters``         which tensors the swarm trains, in the order hivemind sees them
``averaging_codecs``   the compression registry for all-reduce and state averaging
                       (:data:`AVERAGING_CODECS`), with numpy-safe 8-bit codecs
``dht``                starting a DHT peer whose process survives requesters that exit
``sigint``             undoing hivemind's SIGINT trap at averager start-up
=====================  ======================================================================
"""
