"""Choosing settings, in one place: what the application asks of the models below it.

* :mod:`.chunking`: ``--chunking.auto``, a run's chunk settings for its model, data and device
  (memory and cost models on the data's first batches; on CUDA confirmed by a dry run);
* :mod:`.layout`: ``chunkflow plan --auto``, chunk settings and (dp, pp, tp) layout for a
  cluster, ranked by the simulated iteration time;
* :mod:`.launch`: the command line that launches ``plan --auto``'s choice.

The searches themselves are pure functions over the cost, memory and simulator models:
:func:`chunkflow.plan.auto.choose_settings` (one device) and :func:`chunkflow.sim.tune.autotune`
(layouts); this package feeds them the run's model, data, device and family, and reports.
"""
