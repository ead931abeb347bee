"""Bonneville: an OCI runtime that runs each container in its own virtual machine.

The subpackages are the repository's top-level folders (``bonneville/shim`` → ``../shim`` and
so on, committed links), so the checkout itself is the package for every tool: Python with the
checkout root on ``sys.path``, mypy, ruff, pytest, editors and setuptools.
"""
