"""The name of a version's manifest file, the one name every part that writes, reads or skips it uses,
and the name of its metrics' protocol entry.

A version directory holds the model's files plus this JSON manifest (sha256 per file, parent, round,
method, contributions, evaluation metrics; ``docs/INTERFACES.md``). It describes exactly one version, so
a model written *from* a version (a merge, a collected pretrain state) must not inherit it.
"""

MANIFEST_NAME = "coldswarm-manifest.json"

#: The entry of an evaluator's metrics that names its protocol: a fingerprint of its test set and
#: code. Scores under different protocols do not compare, so the publication gate scores a parent
#: again when its stored protocol differs from the candidate's (an upgrade changed the evaluator).
EVALUATION_PROTOCOL_KEY = "protocol"
