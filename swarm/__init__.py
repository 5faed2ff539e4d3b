"""The hivemind protocol both roles speak: the worker's trainer and the coordinator's checkpointer.

Both sides of a pretrain round meet on one hivemind DHT and must agree on its records, on which tensors
are averaged in what order, and on how tensors are compressed. That agreement lives here, below both
roles (it imports neither; ``tests/test_import_boundaries.py`` checks):

===================  ======================================================================
module               what it holds
===================  ======================================================================
``records``          the DHT keys of a run and their typed records (pydantic schemas that
                     every peer validates, as hivemind validates its progress records)
``parameters``       which tensors the swarm trains, in the order hivemind sees them
``averaging_codecs`` the compression registry for all-reduce and state averaging
                     (:data:`AVERAGING_CODECS`), with numpy-safe 8-bit codecs
``averagers``        the prefixes a run's averagers meet under, and DiLoCo's pseudo-gradient
                     all-reduce (:class:`~coldswarm.swarm.averagers.PseudoGradientAverager`)
``dht``              starting a DHT peer whose process survives requesters that exit
``sigint``           undoing hivemind's SIGINT trap at averager start-up
===================  ======================================================================
"""
