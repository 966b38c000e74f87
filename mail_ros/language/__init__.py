"""Instruction embeddings: frozen pretrained text encoders, loaded from local files only."""

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "MINILM_NAME",
    "CacheInfo",
    "CLIPTextEncoder",
    "MiniLMTextEncoder",
    "TextEncoder",
    "TextEncoderError",
    "embed_instructions",
    "load_text_encoder",
]


def __getattr__(name: str):
    # The encoders import torch and transformers; a node that only pairs goals
    # (mail_ros.language.goals) must not pay for them, so they load on first use.
    if name in __all__:
        from mail_ros.language import encoders

        return getattr(encoders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
