"""Streaming inference on Flink: a PyFlink async operator that calls dagserve pipelines
(:mod:`engine.stream.operator`), the record format (:mod:`engine.stream.records`), the calls
with their deadlines and retries (:mod:`engine.stream.caller`), and the job of
``dagserve stream`` (:mod:`engine.stream.job`).  Only ``operator`` imports PyFlink at its top:
the rest imports in any venv."""
