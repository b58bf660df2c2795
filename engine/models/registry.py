"""Maps `config.json`'s `architectures` to model classes."""

from engine.models.config import ModelConfig
from engine.models.decoder import DecoderForCausalLM

MODEL_REGISTRY: dict[str, type[DecoderForCausalLM]] = {
    "LlamaForCausalLM": DecoderForCausalLM,
    "MistralForCausalLM": DecoderForCausalLM,
    "Qwen2ForCausalLM": DecoderForCausalLM,
    "Qwen3ForCausalLM": DecoderForCausalLM,
    "MixtralForCausalLM": DecoderForCausalLM,
    "Qwen2MoeForCausalLM": DecoderForCausalLM,
    "Qwen3MoeForCausalLM": DecoderForCausalLM,
}


def resolve_architecture(hf_config: dict) -> str:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return arch
    raise ValueError(f"architectures: got {archs}, supported {sorted(MODEL_REGISTRY)}")


def build_model(cfg: ModelConfig) -> DecoderForCausalLM:
    return MODEL_REGISTRY[cfg.architecture](cfg)
