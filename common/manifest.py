"""The name of a version's manifest file, the one name every part that writes, reads or skips it uses.

A version directory holds the model's files plus this JSON manifest (sha256 per file, parent, round,
method, contributions, evaluation metrics; ``docs/INTERFACES.md``). It describes exactly one version, so
a model written *from* a version (a merge, a collected pretrain state) must not inherit it.
"""

MANIFEST_NAME = "coldswarm-manifest.json"
