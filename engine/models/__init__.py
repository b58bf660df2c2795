from engine.models.config import ModelConfig, MoEConfig
from engine.models.registry import MODEL_REGISTRY, build_model, resolve_architecture

__all__ = ["MODEL_REGISTRY", "ModelConfig", "MoEConfig", "build_model", "resolve_architecture"]
