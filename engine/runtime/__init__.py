"""The transport-neutral core: the ``engine`` that runs pipelines, how a pipeline is
``assembly``-ed into runners, the ``model`` behind its ``batcher``, in-process (``local``)
runners, the ``workers`` that host models, ``placement`` on the ``devices``, and the
``inspector`` that learns about plugins without importing them here."""
