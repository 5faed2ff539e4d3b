"""The hivemind protocol both roles speak: the worker's trainer and the coordinator's checkpointer.

Both sides of a pretrain round meet on one hivemind DHT and must agree on its records, on which tensors
are averaged in what order, and on how tensors are compressed. That agreement lives here, below both
roles (it imports neither; ``tests/test_import_boundaries.py`` checks):

=====================  ==============================================================="""
