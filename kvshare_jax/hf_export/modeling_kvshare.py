"""PyTorch port of a kvshare_jax model: a Llama with cross-layer KV sharing.

Self-contained (torch + transformers only); shipped with ``kvshare convert --to-hf``
exports and loaded with ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)``. The semantics are kvshare_jax's (``model.py``, ``decode.py``):

- ``layer_types[i] = j``: layer ``i``'s queries attend to the KVs of layer ``j``; only
  KV layers (``j == i`` for some reader) own ``k_proj``/``v_proj`` and a cache slot.
- A layer reading a layer above it (upward) sees only strictly earlier positions; a
  query row that sees no key outputs exactly zero. ``s`` layers use ``sliding_window``.
- A forward without a cache (training, scoring, prefill) iterates each cyclic block
  ``forward_passes + backward_passes`` times from all-zero upward KVs (the first
  ``forward_passes`` without gradient); after ``T`` iterations on ``T`` tokens this is
  exactly the sequential model.
- With a cache, new tokens run one at a time through all layers bottom to top (exact
  sequential semantics). The cache holds the KV layers only.

Shapes: b batch, t new tokens, s keys, n query heads, k KV heads, h head dim.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_kvshare import KVShareConfig

INVALID_POS = 2**31 - 1  # position of a key that no query sees (padding)
# the cache's name in model outputs and generate's model kwargs (renamed in transformers 5)
_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
CACHE_KWARG = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"


def parse_layout(text: str, num_layers: int) -> tuple[list[int], list[bool]]:
    """``"0_2_2_3s"`` -> targets ``[0, 2, 2, 3]`` and sliding flags."""
    parts = text.split("_")
    if len(parts) != num_layers:
        raise ValueError(f"layer_types {text!r} has {len(parts)} layers, expected {num_layers}")
    targets = [int(p.rstrip("s")) for p in parts]
    for i, t in enumerate(targets):
        if not 0 <= t < num_layers or targets[t] != t:
            raise ValueError(f"layer_types {text!r}: layer {i} targets {t}, not a KV layer")
    return targets, [p.endswith("s") for p in parts]


def segments(targets: list[int]) -> list[tuple[int, int, bool]]:
    """``(start, end, iterated)`` runs covering all layers: minimal contiguous cyclic
    blocks (linked by upward targets) are iterated, the rest runs once."""
    out, i, n = [], 0, len(targets)
    while i < n:
        if targets[i] <= i:
            start = i
            while i < n and targets[i] <= i:
                i += 1
            out.append((start, i - 1, False))
            continue
        start, end, k = i, targets[i], i
        while k <= end:
            end = max(end, targets[k])
            k += 1
        out.append((start, end, True))
        i = end + 1
    return out


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (half rotation): ``x [b,t,n,h]``, ``pos [b,t]``."""
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, h, 2, dtype=torch.float32, device=x.device) / h))
    freqs = pos.to(torch.float32)[..., None] * inv_freq  # [b, t, h/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * emb.cos() + rotated * emb.sin()).to(x.dtype)


def attend(q, k, v, q_pos, kv_pos, strict: bool, window: int | None) -> torch.Tensor:
    """``q [b,t,n,h]`` over ``k, v [b,s,k,h]`` -> ``[b,t,n,h]``; a key at position ``kp``
    is visible from ``qp`` iff ``kp <= qp`` (``<`` when ``strict``), ``kp > qp - window``
    and it is not padding. Rows that see nothing output zero."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.float().reshape(b, t, kh, n // kh, h)
    scores = torch.einsum("btkgh,bskh->bkgts", qg, k.float()) * h**-0.5
    qp, kp = q_pos[:, :, None], kv_pos[:, None, :]
    vis = kp < qp if strict else kp <= qp
    if window:
        vis = vis & (kp > qp - window)
    mask = (vis & (kp != INVALID_POS))[:, None, None]  # [b, 1, 1, t, s]
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.where(mask, torch.exp(scores - row_max), torch.zeros_like(scores))
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("bkgts,bskh->btkgh", p, v.float())
    return out.reshape(b, t, n, h).to(q.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class Attention(nn.Module):
    """Projections of one layer; ``k_proj``/``v_proj`` only on KV layers."""

    def __init__(self, config: KVShareConfig, kv_layer: bool):
        super().__init__()
        d, n, k, h = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.q_proj = nn.Linear(d, n * h, bias=False)
        if kv_layer:
            self.k_proj = nn.Linear(d, k * h, bias=False)
            self.v_proj = nn.Linear(d, k * h, bias=False)
        self.o_proj = nn.Linear(n * h, d, bias=False)


class MLP(nn.Module):
    def __init__(self, config: KVShareConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: KVShareConfig, kv_layer: bool):
        super().__init__()
        self.config, self.kv_layer = config, kv_layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, kv_layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def qkv(self, x: torch.Tensor, pos: torch.Tensor):
        """``x [b,t,d]`` -> ``q [b,t,n,h]`` and this layer's own ``(k, v)`` or None."""
        c, (b, t, _) = self.config, x.shape
        hx = self.input_layernorm(x)
        q = self.self_attn.q_proj(hx).view(b, t, c.num_attention_heads, c.head_dim)
        q = rope(q, pos, c.rope_theta)
        if not self.kv_layer:
            return q, None
        k = self.self_attn.k_proj(hx).view(b, t, c.num_key_value_heads, c.head_dim)
        v = self.self_attn.v_proj(hx).view(b, t, c.num_key_value_heads, c.head_dim)
        return q, (rope(k, pos, c.rope_theta), v)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual update from the attention output ``attn [b,t,n,h]``, then the MLP."""
        b, t, _ = x.shape
        x = x + self.self_attn.o_proj(attn.reshape(b, t, -1))
        return x + self.mlp(self.post_attention_layernorm(x))


class KVShareCache:
    """KVs of the KV layers only: ``k[j], v[j] [b,s,k,h]`` plus key positions ``[b,s]``
    (``INVALID_POS`` for padding)."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.kv_pos: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.kv_pos is None else self.kv_pos.shape[1]

    def __len__(self) -> int:
        return len(self.k)

    def next_positions(self, b: int, t: int, device) -> torch.Tensor:
        """Positions ``[b,t]`` of ``t`` new tokens after the cached ones."""
        start = torch.zeros(b, dtype=torch.long, device=device)
        if self.kv_pos is not None:
            valid = self.kv_pos != INVALID_POS
            start = torch.where(valid, self.kv_pos + 1, torch.zeros_like(self.kv_pos)).amax(1)
        return start[:, None] + torch.arange(t, device=device)


class KVSharePreTrainedModel(PreTrainedModel):
    config_class = KVShareConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class KVShareModel(KVSharePreTrainedModel):
    def __init__(self, config: KVShareConfig):
        super().__init__(config)
        self.targets, self.sliding = parse_layout(config.layer_types, config.num_hidden_layers)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, self.targets[i] == i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _window(self, i: int) -> int | None:
        return self.config.sliding_window if self.sliding[i] else None

    def _layer(self, i, x, pos, kv_pos, other):
        """Layer ``i`` on ``x``; reads ``other`` KVs, or its own when ``other`` is None."""
        q, own = self.layers[i].qkv(x, pos)
        kv = own if other is None else other
        strict = self.targets[i] > i
        out = attend(q, kv[0], kv[1], pos, kv_pos, strict, self._window(i))
        return self.layers[i].finish(x, out), own

    def _run(self, layers, x, pos, kv_pos, done, prev):
        """One pass over ``layers``: upward targets from ``prev``, others as computed."""
        new = {}
        for i in layers:
            j = self.targets[i]
            other = None if j == i else (new[j] if j in new else (prev[j] if j > i else done[j]))
            x, own = self._layer(i, x, pos, kv_pos, other)
            if own is not None:
                new[i] = own
        return x, new

    def parallel(self, x, pos, kv_pos):
        """All tokens at once; cyclic blocks iterate ``m + b`` times (``m`` without
        gradient) from zero upward KVs. Returns the output and every KV layer's KVs."""
        c = self.config
        m, nb = c.forward_passes, c.backward_passes
        done = {}
        for start, end, iterated in segments(self.targets):
            layers = range(start, end + 1)
            if not iterated:
                x, new = self._run(layers, x, pos, kv_pos, done, {})
                done.update(new)
                continue
            upward = sorted({self.targets[i] for i in layers if self.targets[i] > i})
            b, t, _ = x.shape
            zero = x.new_zeros(b, t, c.num_key_value_heads, c.head_dim)
            prev = {j: (zero, zero) for j in upward}
            with torch.no_grad():
                for _ in range(m):
                    _, new = self._run(layers, x, pos, kv_pos, done, prev)
                    prev = {j: new[j] for j in upward}
            out = x
            for _ in range(nb):
                out, new = self._run(layers, x, pos, kv_pos, done, prev)
                prev = {j: new[j] for j in upward}
            x = out
            done.update(new)
        return x, done

    def step(self, x, pos, kv_pos, cache: KVShareCache):
        """One new token ``x [b,1,d]`` at ``pos [b,1]`` (key position ``kv_pos [b,1]``)
        through all layers, bottom to top; a KV layer appends its KVs to the cache
        before any layer reads them."""
        kv_pos = torch.cat([cache.kv_pos, kv_pos], dim=1)
        pending = {}
        for i, j in enumerate(self.targets):
            q, own = self.layers[i].qkv(x, pos)
            if own is not None:
                pending[i] = (
                    torch.cat([cache.k[i], own[0]], dim=1),
                    torch.cat([cache.v[i], own[1]], dim=1),
                )
            if j in pending:
                k, v = pending[j]
            else:  # an upward target: not yet written for this token (masked by strictness)
                pad = cache.k[j].new_zeros(cache.k[j][:, :1].shape)
                k, v = torch.cat([cache.k[j], pad], 1), torch.cat([cache.v[j], pad], 1)
            out = attend(q, k, v, pos, kv_pos, j > i, self._window(i))
            x = self.layers[i].finish(x, out)
        for j, (k, v) in pending.items():
            cache.k[j], cache.v[j] = k, v
        cache.kv_pos = kv_pos
        return x

    def forward(self, input_ids, attention_mask=None, cache=None):
        """``input_ids [b,t]`` -> hidden states ``[b,t,d]`` after the final norm.

        Without a filled ``cache`` the tokens run in parallel (and fill ``cache`` when one
        is given); with one they run one at a time after the cached tokens.
        ``attention_mask [b, cached + t]`` marks real tokens (left padding is fine).
        """
        b, t = input_ids.shape
        x = self.embed_tokens(input_ids)
        cached = cache is not None and cache.kv_pos is not None
        if attention_mask is not None:
            mask = attention_mask[:, -t:].bool()
            if cached:
                pos = cache.next_positions(b, t, x.device)
            else:
                pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
        else:
            mask = torch.ones(b, t, dtype=torch.bool, device=x.device)
            pos = cache.next_positions(b, t, x.device) if cached else None
            if pos is None:
                pos = torch.arange(t, device=x.device).expand(b, t)
        kv_pos = torch.where(mask, pos, torch.full_like(pos, INVALID_POS))
        if not cached:
            x, kv = self.parallel(x, pos, kv_pos)
            if cache is not None:
                cache.k = {j: kv[j][0] for j in kv}
                cache.v = {j: kv[j][1] for j in kv}
                cache.kv_pos = kv_pos
            return self.norm(x)
        outs = []
        for s in range(t):
            sl = slice(s, s + 1)
            outs.append(self.step(x[:, sl], pos[:, sl], kv_pos[:, sl], cache))
        return self.norm(torch.cat(outs, dim=1))


class KVShareForCausalLM(KVSharePreTrainedModel, GenerationMixin):
    def __init__(self, config: KVShareConfig):
        super().__init__(config)
        self.model = KVShareModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return None if self.config.tie_word_embeddings else self.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own KVShareCache

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVShareCache | None = None,
        past_key_values: KVShareCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``input_ids [b,t]`` -> logits ``[b,t,v]`` (fp32); ``labels`` adds the shifted
        next-token loss; ``use_cache`` returns a ``KVShareCache`` to continue from."""
        cache = cache if isinstance(cache, KVShareCache) else past_key_values
        if not isinstance(cache, KVShareCache):
            use_cache = self.config.use_cache if use_cache is None else use_cache
            cache = KVShareCache() if use_cache else None
        x = self.model(input_ids, attention_mask, cache)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        if self.config.tie_word_embeddings:
            logits = F.linear(x, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(x)
        logits = logits.float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KWARG: cache})

    def prepare_inputs_for_generation(
        self, input_ids, cache=None, past_key_values=None, attention_mask=None, **kwargs
    ) -> dict:
        """Feeds only the tokens the cache has not seen."""
        cache = cache if isinstance(cache, KVShareCache) else past_key_values
        if isinstance(cache, KVShareCache) and cache.kv_pos is not None:
            input_ids = input_ids[:, cache.get_seq_length() :]
        else:
            cache = None
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            CACHE_KWARG: cache,
            "use_cache": kwargs.get("use_cache"),
        }
