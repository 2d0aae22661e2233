"""The registry's catalog: one module per problem family.

Importing a module registers its problems with :func:`convexddn.registry.register`.
Installed as ``convexddn.problems`` (see ``pyproject.toml``).
"""
