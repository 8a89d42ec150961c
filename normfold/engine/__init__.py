"""The fold engine: graph view -> norm units -> rule table -> plan records.

* :mod:`~normfold.engine.view`: the narrow interface rules read a graph through (design note
  there); :mod:`~normfold.engine.torch_view` implements it for ``torch.export`` captures;
* :mod:`~normfold.engine.norms`: the norm units and their per-channel affine maps;
* :mod:`~normfold.engine.rules`: one class per fold pattern, in a table whose order is the priority;
* :mod:`~normfold.engine.planner`: runs the table to a fixpoint and records every decision;
* :mod:`~normfold.engine.records`: the plan as pure data (what apply, replan and reports read).
"""
