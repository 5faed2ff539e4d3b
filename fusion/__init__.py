"""coldswarm.fusion: what a model is as tensors, and how models combine.

Pure library code (no grpc, no coordinator or worker imports). Modules, one job each:

* :mod:`.checkpoint`   -- read/write HF model directories of safetensors, tensor by tensor, atomically
* :mod:`.contribution` -- the contribution payload: save/open, :class:`ContributionMeta`, ``from_peft_model``
* :mod:`.materialise`  -- full / delta / LoRA / IA3 -> full fp32 weights, one tensor (or row range) at a time
* :mod:`.validate`     -- ``validate_contribution``: does an upload fit the base? (names the tensor if not)
* :mod:`.methods`      -- the merge methods, pure tensor math, one registry: ``METHODS``
* :mod:`.screening`    -- delta-norm screening of outlier contributions (flag / clip / drop)
* :mod:`.merge`        -- ``merge_checkpoints``: the streaming driver the coordinator calls
* :mod:`.statistics`   -- ``collect_fisher`` / ``collect_gram`` on a worker's own data
* :mod:`.codecs`       -- compression codecs, one registry: ``CODECS``
* :mod:`.errors`       -- the exceptions, each with a message a person can act on

See fusion/README.md for how to use and tune each method and codec. Submodules are imported
explicitly (``from coldswarm.fusion.merge import merge_checkpoints``); nothing registers itself on import.
"""
