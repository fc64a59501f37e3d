"""Frozen open_clip backbone shared by all clients (see :class:`Backbone`)."""

from fedprompt.backbone.loading import load_open_clip, register_bundled_configs, register_model_config
from fedprompt.backbone.model import Backbone, PromptTokens, load_backbone

__all__ = ["Backbone", "PromptTokens", "load_backbone", "load_open_clip", "register_bundled_configs",
           "register_model_config"]
