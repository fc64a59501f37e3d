"""fedprompt: federated prompt learning on frozen CLIP models, driven by Lightning Fabric."""

__version__ = "0.1.0"
