"""fedprompt: federated prompt learning on frozen CLIP models, driven by Lightning Fabric."""

__version__ = "0.1.0"  # the package version (pyproject.toml reads it); CHANGELOG.md says what changed
