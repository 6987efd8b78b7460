"""The worker process that hosts plugins: what the server's model workers and
``PluginHarness(isolated=True)`` both run.

It imports only :mod:`model_plugins` and the standard library.  ``main`` is the worker's loop
(load, predict on one thread per instance, answer by correlation id), ``wire`` frames
messages over a Unix socket (pickle 5, buffers out of band), ``messages`` types them, and
``postmortem`` records which call runs on which thread so that, after a crash, the parent can
tell the culprit from its neighbours.  Private to dagserve: plugin authors never import it.
"""
