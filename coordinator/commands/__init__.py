"""The coordinator's sub-commands of ``perspective``.

Registered through the ``perspective.commands`` entry points in ``pyproject.toml``.
"""
