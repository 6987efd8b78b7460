"""Collection rules of the suite."""

# These modules import TensorFlow and Paddle at their tops, on purpose: only worker and
# inspector processes may import them. Collected (e.g. by --doctest-modules) they would load
# both frameworks into the pytest process, where tensorflow-then-paddle is a segfault.
collect_ignore_glob = ["fwplugins/*"]
