"""The model's shape, read from a HF `config.json` into one frozen dataclass."""

from dataclasses import dataclass


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool  # divide the top-k weights by their sum (Mixtral; Qwen's norm_topk_prob)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's gated shared expert; 0 = none
    sparse_layers: tuple[int, ...] = ()  # layers with a MoE block; the others are dense MLPs


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, object], ...] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    moe: MoEConfig | None = None

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, list | tuple) else [x]


def _rope(hf: dict) -> tuple[float, dict | None]:
    """Both conventions: `rope_theta` + `rope_scaling` (checkpoints) and `rope_parameters` (transformers 5)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(hf.get("rope_theta", 10000.0))
        scaling = dict(hf.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **scaling}


def _sliding_windows(hf: dict, num_layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if hf.get("model_type") in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        if not hf.get("use_sliding_window"):
            return (None,) * num_layers
        first = hf.get("max_window_layers", num_layers)
        return tuple(window if i >= first else None for i in range(num_layers))
    return (window or None,) * num_layers


def _moe(hf: dict, num_layers: int) -> MoEConfig | None:
    num_experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
    if not num_experts:
        return None
    if hf.get("model_type") == "mixtral":
        return MoEConfig(
            num_experts=num_experts,
            top_k=hf["num_experts_per_tok"],
            intermediate_size=hf["intermediate_size"],
            renormalize=True,
            sparse_layers=tuple(range(num_layers)),
        )
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = set(hf.get("mlp_only_layers") or [])
    sparse = tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
    return MoEConfig(
        num_experts=num_experts,
        top_k=hf["num_experts_per_tok"],
        intermediate_size=hf["moe_intermediate_size"],
        renormalize=bool(hf.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
        sparse_layers=sparse,
    )


def model_config_from_hf(hf: dict, architecture: str, generation_config: dict | None = None) -> ModelConfig:
    num_layers = hf["num_hidden_layers"]
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    theta, scaling = _rope(hf)
    eos = _as_list(hf.get("eos_token_id")) + _as_list((generation_config or {}).get("eos_token_id"))
    return ModelConfig(
        architecture=architecture,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf.get("intermediate_size", 0),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bool(
            hf.get("attention_bias", False)
            or hf.get("qkv_bias", False)
            or hf.get("model_type") in ("qwen2", "qwen2_moe")
        ),
        qk_norm=hf.get("model_type") in ("qwen3", "qwen3_moe"),
        sliding_windows=_sliding_windows(hf, num_layers),
        dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        moe=_moe(hf, num_layers),
    )
