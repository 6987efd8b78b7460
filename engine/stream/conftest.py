"""pytest collects engine/ for doctests (``--doctest-modules``): the modules that import
PyFlink are left out where it is not installed (the main venv; it lives in .venv-flink)."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("pyflink") else ["operator.py", "sink.py"]
