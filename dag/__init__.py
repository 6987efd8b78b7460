"""Pipelines: YAML-defined DAGs of model plugins, loaded, checked and drawn.

>>> from dag import load_pipeline, PipelineInvalid
"""

from __future__ import annotations

from dag.errors import PipelineError, PipelineInvalid, RenderError
from dag.graph import build_graph, validate
from dag.picture import render
from dag.pipeline import Pipeline, load_pipeline, load_pipelines
from dag.runner import Runner

__all__ = [
    # loading
    "Pipeline",
    "load_pipeline",
    "load_pipelines",
    # problems
    "PipelineError",
    "PipelineInvalid",
    "RenderError",
    # the graph
    "build_graph",
    "validate",
    "render",
    # running
    "Runner",
]
