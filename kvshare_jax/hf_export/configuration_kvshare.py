"""Config of a kvshare_jax model with cross-layer KV sharing (``lckv-llama`` format).

Shipped with ``kvshare convert --to-hf`` exports; loaded by transformers through
``auto_map`` with ``trust_remote_code=True``. ``layer_types`` is the layer-to-KV
mapping string (``"0_2_2_3"``, an ``s`` suffix marks a sliding-window layer);
``forward_passes``/``backward_passes`` (m, b) set the iterations of cyclic blocks.
"""

from transformers import PretrainedConfig


class KVShareConfig(PretrainedConfig):
    model_type = "lckv-llama"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        intermediate_size: int = 1376,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 1024,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        tie_word_embeddings: bool = False,
        layer_types: str = "",
        forward_passes: int = 7,
        backward_passes: int = 2,
        sliding_window: int = 0,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        params = kwargs.pop("rope_parameters", None) or {}
        self.rope_theta = float(params.get("rope_theta", rope_theta))
        self.rms_norm_eps = rms_norm_eps
        self.forward_passes = forward_passes
        self.backward_passes = backward_passes
        self.sliding_window = sliding_window
        self.use_cache = use_cache
        kwargs.pop("rope_scaling", None)  # plain RoPE only (the exporter writes none)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        # set after the base init: transformers rewrites list-like `layer_types` there
        self.layer_types = layer_types or "_".join(map(str, range(num_hidden_layers)))
