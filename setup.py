"""Package discovery for the wheel; everything else is in pyproject.toml.

Every package under sd35_core, sd35_cli and sd35_train is found. The pack's ComfyUI side (nodes/, js/) is not
installed: ComfyUI loads the pack folder itself, and a top-level ``nodes`` package would shadow ComfyUI's own.
The bundled tiny shapes model (``assets/`` in the repository) travels as the data package ``sd35_train.assets``,
which pyproject.toml cannot map onto a folder outside ``sd35_train`` while packages are found automatically.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["sd35_core*", "sd35_cli*", "sd35_train*"]) + ["sd35_train.assets"],
    package_dir={"sd35_train.assets": "assets"},
)
