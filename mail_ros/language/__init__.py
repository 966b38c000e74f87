"""Instruction embeddings: frozen pretrained text encoders, loaded from local files only."""

from mail_ros.language.encoders import (
    DEFAULT_CLIP_MODEL,
    MINILM_NAME,
    CacheInfo,
    CLIPTextEncoder,
    MiniLMTextEncoder,
    TextEncoder,
    TextEncoderError,
    embed_instructions,
    load_text_encoder,
)

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
