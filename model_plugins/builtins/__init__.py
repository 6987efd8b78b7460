"""The built-in nodes, named in pipelines by the short names of ``registry.BUILTINS``.

* ``identity``: passes its inputs through (``identity.Identity``).
* ``image_decode``: encoded images -> normalised float32 CHW pixels (``image_decode.ImageDecode``).
* ``concat_fusion`` / ``weighted_mean_fusion``: join embeddings (``fusion``).

Each is imported only when a pipeline names it.  Cheap ones set ``inline = True``: a hint that
the engine may run them in the event loop instead of a thread.
"""
