"""config.json and state: loading, JSON-Schema validation and defaults.

Submodules are imported by name (``bonneville.spec.config``) so that light commands never pay for
the heavy ones.
"""
