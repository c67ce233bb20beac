"""The stages of a recipe run, each a plain function ``stage(state, config)`` of the typed
:class:`prunekit.jobs.state.RunState` (``prunekit.jobs.run.STAGES`` maps stage types to them):
``train`` (train / finetune, distillation teacher), ``prune`` (unstructured pruning, sensitivity
allocation, L0 gates), ``structured`` (physical shrinking, latency allocation), ``measure`` (evaluate,
latency, compiled twins, agreement), ``output`` (quantize, export incl. C export) and ``checks`` (the
recipe checked before any stage runs)."""
