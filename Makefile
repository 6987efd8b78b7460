# Every target creates .venv and installs what it needs, Debian packages included.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# reinstall when setup.py changes
STAMP  := $(VENV)/.installed-$(shell cksum setup.py | cut -d' ' -f1)
# PyFlink's venv (see flink-venv below); defined here, before the targets that depend on it
FLINK_VENV  := .venv-flink
FLINK_STAMP := $(FLINK_VENV)/.installed-flink-$(shell cksum setup.py | cut -d' ' -f1)
# the fast lane installs only the package and its dev tools (no framework extras)
FAST_STAMP := $(VENV)/.installed-dev-$(shell cksum setup.py | cut -d' ' -f1)
# Debian packages the suite and the CLI use: the Apache Thrift compiler (the test that
# generates an official client), graphviz (`dagserve graph`), prometheus (the test that
# scrapes a real server) and kubernetes-client (`kubectl kustomize` renders deploy/kubernetes
# in tests/test_deploy.py; its overlays need kustomize v4.5 or later) and Java 17 (the Flink
# mini-cluster of `dagserve stream`); see system-deps.
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all test test-fast gpu-check demo stream-demo bench ray-venv flink-venv lint check system-deps clean

all: test

system-deps:
	@missing=""; \
	command -v thrift >/dev/null || missing="$$missing thrift-compiler"; \
	command -v dot >/dev/null || missing="$$missing graphviz"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v kubectl >/dev/null || missing="$$missing kubernetes-client"; \
	command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the suite serves real PyTorch, TensorFlow and Paddle models (each in its own worker)
	$(PY) -m pip install -q -e '.[dev,torch,tensorflow,paddle,otel,examples,registry,ray]'
	rm -f $(VENV)/.installed-*; touch $@

test: system-deps $(STAMP) $(FLINK_STAMP)
	$(PY) -m pytest -q

$(FAST_STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The fast lane, for changes to dag/, the SDK and the front: no torch, TensorFlow or Paddle
# to install, and no server started (tests marked `frameworks` or `e2e` are left out).
test-fast: $(FAST_STAMP)
	$(PY) -m pytest -q -m "not frameworks and not e2e"

# the GPU tests (tests/gpu): every adapter on each card, placement over real NVML; they skip,
# saying why, where no CUDA device is visible
gpu-check: $(STAMP)
	$(PY) -m pip install -q -e '.[gpu]'
	$(PY) -m pytest -q -m gpu tests/gpu

demo: system-deps $(STAMP)
	$(PY) examples/post_understanding/demo.py

# the example's stream of posts (make_stream.py) through the pipeline on Flink: dagserve
# stream from .venv-flink against a server it starts, then a summary of the sink
stream-demo: system-deps $(STAMP) $(FLINK_STAMP)
	$(PY) examples/post_understanding/stream_demo.py

# Ray Serve for benchmarks.ray_serve, in a venv of its own (Ray pins its own dependencies);
# installed before the run, so that the scenario measures and never installs. Keep the pins
# alike in benchmarks/ray_serve.py (RAY_REQUIREMENTS).
RAY_VENV  := benchmarks/.ray-venv
RAY_PINS  := 'ray[serve]==2.60.0' 'torch==2.13.0' 'numpy==2.4.6'
RAY_STAMP := $(RAY_VENV)/.installed-ray-2.60.0

$(RAY_STAMP):
	test -x $(RAY_VENV)/bin/python || $(PYTHON) -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/python -m pip install -q $(RAY_PINS)
	rm -f $(RAY_VENV)/.installed-*; touch $@

ray-venv: $(RAY_STAMP)

# PyFlink for `dagserve stream` (engine/stream), in a venv of its own: apache-flink pins numpy,
# protobuf, grpcio and pyarrow below what TensorFlow, Paddle and Ray in .venv need.  dagserve
# and its own dependencies, no frameworks (the operator is a client); the tests run the job as
# .venv-flink/bin/dagserve stream.  Java 17 runs the mini-cluster.

$(FLINK_STAMP): setup.py
	test -x $(FLINK_VENV)/bin/python || $(PYTHON) -m venv $(FLINK_VENV)
	$(FLINK_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLINK_VENV)/bin/python -m pip install -q -e '.[flink]'
	rm -f $(FLINK_VENV)/.installed-*; touch $@

flink-venv: $(FLINK_STAMP)

bench: system-deps $(STAMP) $(RAY_STAMP) $(FLINK_STAMP)
	$(PY) -m benchmarks.run_all

lint: $(STAMP)
	$(VENV)/bin/ruff format engine dag model_plugins idl tests examples
	$(VENV)/bin/ruff check --fix engine dag model_plugins idl tests examples

check: $(STAMP)
	$(VENV)/bin/ruff check engine dag model_plugins idl tests examples
	$(VENV)/bin/mypy engine dag model_plugins idl

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
