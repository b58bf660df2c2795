from engine.attention.backend import AttentionBackend, AttentionMetadata, ForwardContext, get_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "ForwardContext", "get_backend"]
