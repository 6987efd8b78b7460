"""The parent's side of the model workers: one process per (framework, device), hosting every
model placed there.

The front process never imports a deep-learning framework; model plugins load and predict in
these workers.  ``process`` is the parent's handle on one worker and ``pool`` starts, watches
and restarts them.  The worker's own side (``main``, the ``wire`` framing, the ``messages``,
the ``postmortem`` records) lives in :mod:`model_plugins._host`: it needs only the SDK and the
standard library, so ``PluginHarness(isolated=True)`` runs the same code.
"""
