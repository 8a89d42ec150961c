"""Folding a LayerNorm / RMSNorm / GroupNorm's affine part into the Linear layers it feeds.

A norm ends with a per-channel affine map on its normalized output ``n``::

    y = gamma * n + beta            (gamma = offset + w: offset 1 for Gemma's ``x * (1 + w)``)

When every consumer of ``y`` is a Linear ``z = W y + b`` over that channel axis (reached directly
or through ops that only move elements: views, reshapes, head splits and merges, dtype casts; a
batch of expert matrices counts as Linears),

    W y + b = (W * gamma[None, :]) n + (b + W beta)

exactly, and the norm becomes parameter-free (``w := 1 - offset``, ``beta := 0``): its module,
module path and state-dict keys stay. A consumer reading channel ``c[j]`` of the norm on its input
``j`` (a slice, a repeat over heads) takes ``gamma[c[j]]`` and ``beta[c[j]]``. All consumers of
one norm take the same scale, or none does.

Where ``beta`` would need a bias a consumer has no slot for, ``gamma`` still folds and the norm
keeps the shift ``beta / gamma`` (``y' = n + beta / gamma``, so ``W' y' + b = W (gamma n + beta) + b``),
with the code ``new_bias_needed``; ``new_biases=True`` gives ``nn.Linear`` consumers a new bias.
A scale (not a shift) also passes a product on the way, ``(gamma n) * z = gamma (n * z)`` (a gate,
a router weight). A consumer weight another op reads too (a tied LM head) is refused, or with
``untie`` copied for the consumer alone.

* :mod:`.view`: what the planner asks of a graph beyond :class:`~normfold.engine.view.GraphView`
  (the norms found by pattern, dtype casts), IR-neutral;
* :mod:`.torch_norms`: those queries over a ``torch.export`` capture (the patterns);
* :mod:`.records`: the plan as data and its float64 values;
* :mod:`.planner`: the walk to the consumers and the decision per norm;
* :mod:`.apply`: the plan's values written into the user's module.
"""
