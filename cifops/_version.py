"""The cifops version: the one place it is written (pyproject.toml reads it as
[tool.setuptools.dynamic] version; cifops.__version__ is it)."""

__version__ = "0.1.0"
