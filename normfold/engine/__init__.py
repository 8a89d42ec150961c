"""The fold engine: capture -> graph view -> norm units -> rule table -> plan records -> apply.

* :mod:`~normfold.engine.capture`: the ``torch.export`` capture; :mod:`~normfold.engine.aten` its
  ATen op tables; :mod:`~normfold.engine.plan` the entry point over a capture;
* :mod:`~normfold.engine.view`: the narrow interface rules read a graph through (design note
  there); :mod:`~normfold.engine.torch_view` implements it for ``torch.export`` captures;
* :mod:`~normfold.engine.norms`: the norm units and their per-channel affine maps;
* :mod:`~normfold.engine.rules`: one class per fold pattern, in a table whose order is the priority;
* :mod:`~normfold.engine.planner`: runs the table to a fixpoint and records every decision;
* :mod:`~normfold.engine.records`: the plan as pure data (what apply, replan and reports read);
* :mod:`~normfold.engine.apply`, :mod:`~normfold.engine.apply_program`: the plan applied to the
  module and the exported program; :mod:`~normfold.engine.reparam` (branch merges),
  :mod:`~normfold.engine.replan`, :mod:`~normfold.engine.rebuild`, :mod:`~normfold.engine.parts`
  (capture in parts), :mod:`~normfold.engine.gate` and :mod:`~normfold.engine.postcheck` (checks).
"""
