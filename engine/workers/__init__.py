"""Worker processes: one per (framework, device), hosting every model placed there.

The front process never imports a deep-learning framework; model plugins load and predict in
these workers.  ``wire`` frames messages, ``messages`` types them, ``main`` is the worker's
side, ``process`` the parent's handle on one worker, ``pool`` starts, watches and restarts them,
and ``postmortem`` tells, after a worker died, which of its calls killed it.
"""
