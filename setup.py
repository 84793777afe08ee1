"""Package list for setuptools (metadata lives in pyproject.toml).

kernels/ sits at the repository root but installs as vllm_longspec.kernels;
[tool.setuptools.packages.find] cannot express that, so it is listed here.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["vllm_longspec", "vllm_longspec.*"])
packages += ["vllm_longspec.kernels"] + [
    f"vllm_longspec.kernels.{p}" for p in find_packages("kernels")
]

setup(packages=packages)
