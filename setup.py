"""pdq's packages: pdq/ and its subpackages, plus the top-level conf/ shipped as the package pdq.conf (its YAML
is package data). Everything else is in setup.cfg."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["pdq", "pdq.*"]), "pdq.conf"], package_dir={"pdq.conf": "conf"})
