"""`OpenMythosHFConfig`: a transformers config that carries every `MythosConfig` field under its
own name, so `config.json` reads like our config and converts back without a mapping table.

This file is also saved next to exported weights for `trust_remote_code=True` loading, its
package imports pointed at a copy of the core code (see `openmythos.hf.vendor`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from openmythos.config import MythosConfig

_MYTHOS_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MythosConfig)}


class OpenMythosHFConfig(PretrainedConfig):
    model_type = "openmythos"
    # the standard names some transformers utilities look up
    attribute_map = {
        "hidden_size": "dim",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(self, **kwargs: Any):
        fields = {name: kwargs.pop(name, default) for name, default in _MYTHOS_DEFAULTS.items()}
        MythosConfig(**fields)  # validates now: a bad config.json fails at load, naming the field
        for name, value in fields.items():
            setattr(self, name, value)
        # the LM head is the embedding used transposed; there is no separate head weight to tie
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> OpenMythosHFConfig:
        """A saved config.json (from_pretrained reads it through here): it spells out every model
        field (to_diff_dict), so none may be missing; a config built in code may leave some out."""
        MythosConfig.from_saved({**config_dict, **kwargs}, "config.json")
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_mythos(cls, cfg: MythosConfig, **kwargs: Any) -> OpenMythosHFConfig:
        return cls(**cfg.to_dict(), **kwargs)

    def to_mythos(self) -> MythosConfig:
        return MythosConfig(**{name: getattr(self, name) for name in _MYTHOS_DEFAULTS})

    def to_diff_dict(self) -> dict[str, Any]:
        # config.json spells out every model field, not only those that differ from today's
        # defaults, so a later change of a MythosConfig default cannot change a saved model
        return {**super().to_diff_dict(), **self.to_mythos().to_dict()}
