"""The stages of a recipe run, as mixin classes of :class:`prunekit.jobs.run.Run` (which holds the
state they share and runs them in order): ``train`` (train / finetune, distillation teacher),
``prune`` (unstructured pruning, sensitivity allocation, L0 gates), ``structured`` (physical
shrinking, latency allocation), ``measure`` (evaluate, latency, compiled twins, agreement), ``output``
(quantize, export incl. C export) and ``checks`` (the recipe checked before any stage runs)."""
