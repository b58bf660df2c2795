from engine.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    CodedLayer,
    ForwardContext,
    get_backend,
)

__all__ = ["AttentionBackend", "AttentionMetadata", "CodedLayer", "ForwardContext", "get_backend"]
