"""Installs the package `largebatch` from projects/largebatch (a detectron2 project)."""
from setuptools import find_packages, setup

setup(
    name="largebatch",
    version="0.1.0",
    description="Large-batch training of object detectors (MegDet, LargeDet, CoolDet, AGVM) on detectron2",
    package_dir={"": "projects"},
    packages=find_packages("projects"),
    python_requires=">=3.8",
    # torch, torchvision and detectron2 are installed by tools/setup_env.sh (`make setup`): detectron2 has
    # no registry release, and pinning torch here would fight an existing installation.
    install_requires=["fvcore", "pycocotools", "matplotlib", "tensorboard"],
)
