"""Compact forward for Llama-family decoders (llama, mistral, qwen2) over a slot-based KV cache.

gpt-fast style: the weights come straight from the Hugging Face modules (q/k/v and gate/up are
fused by making the modules' weights views of one tensor, so no extra memory), the KV cache is
one preallocated buffer per layer, (slots, kv_heads, capacity, head_dim), written at each slot's
position, and a decode step is a fixed sequence of tensor ops over the first B slots with no
per-step Python objects. It mirrors the Hugging Face forward op for op (RMSNorm statistics in
fp32, rotary embeddings from the model's own module), so greedy tokens match `model.generate`.

bf16 on CPU additionally keeps a oneDNN-blocked copy of each weight: PyTorch's bf16
matrix-vector product runs at about half the speed of oneDNN's on blocked weights, and the
results are bit-identical. This costs one more copy of the linear weights in memory.

A layer whose attention was replaced by nothing (a depth-pruned FFN-only block; the variant
format knows which, `variants.noop.noop_layers`) runs only its MLP and keeps no cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from service.engine.runner import max_positions
from variants.noop import noop_layers

FAST_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2"})
CAPACITY_STEP = 256  # the cache grows in multiples of this many positions
ATTENTION_BUCKET = 64  # decode attends over the used positions rounded up to this


@dataclass(frozen=True)
class _Linear:
    weight: torch.Tensor
    bias: torch.Tensor | None
    packed: torch.Tensor | None = None  # oneDNN-blocked copy of `weight` (bf16 on CPU)

    @classmethod
    def of(cls, module: nn.Linear) -> _Linear:
        return cls(module.weight, module.bias)

    def pack(self) -> _Linear:
        """This linear with a blocked weight copy (oneDNN for bf16, MKL for fp32)."""
        w = self.weight.detach()
        if w.dtype == torch.bfloat16:
            return _Linear(self.weight, self.bias, torch.ops.mkldnn._reorder_linear_weight(w, 1))
        return _Linear(self.weight, self.bias, torch.ops.mkl._mkl_reorder_linear_weight(w, 1))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        if self.weight.dtype == torch.bfloat16:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, 1)


def can_pack(model: PreTrainedModel) -> bool:
    """Whether oneDNN blocked bf16 weights apply: bf16 weights on a CPU with bf16 support."""
    return (
        model.device.type == "cpu"
        and model.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


@dataclass(frozen=True)
class _Norm:
    weight: torch.Tensor
    eps: float

    @classmethod
    def of(cls, module: nn.Module) -> _Norm:
        return cls(module.weight, float(module.variance_epsilon))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # LlamaRMSNorm's arithmetic (statistics in fp32, scale in the input dtype) in fewer ops.
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)


def _fuse(modules: list[nn.Linear]) -> _Linear:
    """One linear computing `modules` side by side; their weights become views of the fused weight.

    The model keeps working (and uses no extra memory): each module's parameter now points
    into the fused tensor. Biases are fused too when every module has one.
    """
    weight = torch.cat([m.weight.detach() for m in modules])
    with_bias = all(m.bias is not None for m in modules)
    bias = torch.cat([m.bias.detach() for m in modules]) if with_bias else None
    start = 0
    for m in modules:
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(weight[start : start + rows], requires_grad=m.weight.requires_grad)
        if with_bias:
            m.bias = nn.Parameter(bias[start : start + rows], requires_grad=m.bias.requires_grad)
        start += rows
    return _Linear(weight, bias)


@dataclass(frozen=True)
class _Layer:
    attn_norm: _Norm | None  # None: the layer has no attention
    qkv: _Linear | None  # q, k and v projections side by side
    o: _Linear | None
    mlp_norm: _Norm
    gate_up: _Linear  # gate and up projections side by side
    down: _Linear
    act: Callable[[torch.Tensor], torch.Tensor]


def _has_attention(layer: nn.Module) -> bool:
    attn = getattr(layer, "self_attn", None)
    return attn is not None and hasattr(attn, "q_proj")


def unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why the compact forward cannot run this model, or None if it can."""
    config = model.config
    if config.model_type not in FAST_ARCHITECTURES:
        return f"architecture {config.model_type!r} has no compact forward"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        return "unexpected module layout"
    attention_free = set(noop_layers(model))
    for i, layer in enumerate(inner.layers[: config.num_hidden_layers]):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return f"layer {i} has no gated MLP"
        if i not in attention_free and not _has_attention(layer):
            return f"layer {i} has an attention module of unknown form"
    return None


def _layer(layer: nn.Module, attention_free: bool) -> _Layer:
    attn = None if attention_free else layer.self_attn
    mlp = layer.mlp
    return _Layer(
        attn_norm=_Norm.of(layer.input_layernorm) if attn is not None else None,
        qkv=_fuse([attn.q_proj, attn.k_proj, attn.v_proj]) if attn is not None else None,
        o=_Linear.of(attn.o_proj) if attn is not None else None,
        mlp_norm=_Norm.of(layer.post_attention_layernorm),
        gate_up=_fuse([mlp.gate_proj, mlp.up_proj]),
        down=_Linear.of(mlp.down_proj),
        act=F.silu if type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation") else mlp.act_fn,
    )


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as in Hugging Face's `apply_rotary_pos_emb`: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _packed(layer: _Layer) -> _Layer:
    def pack(linear: _Linear | None) -> _Linear | None:
        return linear.pack() if linear is not None else None

    return replace(layer, qkv=pack(layer.qkv), o=pack(layer.o), gate_up=layer.gate_up.pack(), down=layer.down.pack())


class LlamaRunner:
    """Prefill and batched decode for a Llama-family model over `max_slots` cache slots."""

    def __init__(self, model: PreTrainedModel, max_slots: int, max_seq: int, pack: bool | None = None) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"cannot use the compact forward: {reason}")
        config = model.config
        self.max_slots = max_slots
        self.max_seq = max_positions(model, max_seq)
        self.device = model.device
        self.dtype = model.lm_head.weight.dtype
        # The cache (and decode attention) is fp32 on CPU: bf16 batched matmuls there take a slow
        # path (about 3x the time of fp32 at decode sizes), and upcasting is exact.
        self.cache_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        attention_free = set(noop_layers(model))
        self.layers = [
            _layer(layer, i in attention_free) for i, layer in enumerate(inner.layers[: config.num_hidden_layers])
        ]
        self.norm = _Norm.of(inner.norm)
        self.lm_head = _Linear.of(model.lm_head)
        # bf16 on CPU: PyTorch's own bf16 matrix-vector product reaches about half the bandwidth
        # of oneDNN's with pre-blocked weights. The blocked copies cost one more copy of the weights.
        self.packed = can_pack(model) if pack is None else pack
        if self.packed:
            self.layers = [_packed(layer) for layer in self.layers]
            self.lm_head = self.lm_head.pack()
        self.capacity = 0
        self.k_cache: list[torch.Tensor | None] = []
        self.v_cache: list[torch.Tensor | None] = []
        self._grow(min(CAPACITY_STEP, self.max_seq))
        self.slot_ids = torch.arange(max_slots, device=self.device)
        self.positions = torch.arange(self.max_seq, device=self.device)

    def _grow(self, needed: int) -> None:
        """Make the cache hold at least `needed` positions per slot (copying what it holds)."""
        if needed <= self.capacity:
            return
        if needed > self.max_seq:
            raise ValueError(f"{needed} positions exceed the cache limit of {self.max_seq}")
        capacity = min(self.max_seq, -(-needed // CAPACITY_STEP) * CAPACITY_STEP)
        shape = (self.max_slots, self.n_kv_heads, capacity, self.head_dim)
        k_cache, v_cache = [], []
        for i, layer in enumerate(self.layers):
            if layer.qkv is None:
                k_cache.append(None)
                v_cache.append(None)
                continue
            k = torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
            if self.capacity:
                k[:, :, : self.capacity] = self.k_cache[i]
                v[:, :, : self.capacity] = self.v_cache[i]
            k_cache.append(k)
            v_cache.append(v)
        self.k_cache, self.v_cache, self.capacity = k_cache, v_cache, capacity

    def _qkv(self, layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = x.shape
        nh, nkv = self.n_heads, self.n_kv_heads
        qkv = layer.qkv(layer.attn_norm(x)).view(B, T, nh + 2 * nkv, self.head_dim).transpose(1, 2)
        qk = _rope(qkv[:, : nh + nkv], cos.unsqueeze(1), sin.unsqueeze(1))  # q and k heads at once
        return qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv :]  # (B, nh, T, hd), (B, nkv, T, hd) x2

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = layer.gate_up(layer.mlp_norm(x)).chunk(2, dim=-1)
        return x + layer.down(layer.act(gate) * up)

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        T = len(ids)
        self._grow(T)
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        x = F.embedding(tokens, self.embed)  # (1, T, hidden)
        cos, sin = self.rotary(x, self.positions[:T].unsqueeze(0))
        for layer, k_cache, v_cache in zip(self.layers, self.k_cache, self.v_cache, strict=True):
            if layer.qkv is not None:
                q, k, v = self._qkv(layer, x, cos, sin)
                k_cache[slot, :, :T] = k[0]
                v_cache[slot, :, :T] = v[0]
                a = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scale, enable_gqa=True)
                x = x + layer.o(a.transpose(1, 2).reshape(1, T, -1))
            x = self._mlp(layer, x)
        return self.lm_head(self.norm(x[:, -1]))[0]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, first: int = 0) -> torch.Tensor:
        B = tokens.shape[0]
        longest = int(positions.max()) + 1
        self._grow(longest)
        L = min(self.capacity, -(-longest // ATTENTION_BUCKET) * ATTENTION_BUCKET)
        x = F.embedding(tokens.view(B, 1), self.embed)  # (B, 1, hidden)
        cos, sin = self.rotary(x, positions.view(B, 1))
        visible = self.positions[:L].unsqueeze(0) <= positions.unsqueeze(1)  # (B, L)
        bias = torch.zeros(B, 1, 1, L, dtype=torch.float32, device=self.device)
        bias.masked_fill_(~visible.view(B, 1, 1, L), float("-inf"))
        rows = slice(first, first + B)
        for layer, k_cache, v_cache in zip(self.layers, self.k_cache, self.v_cache, strict=True):
            x = self._decode_layer(layer, x, cos, sin, bias, rows, positions, k_cache, v_cache)
        return self.lm_head(self.norm(x[:, -1]))

    def _decode_layer(
        self,
        layer: _Layer,
        x: torch.Tensor,  # (B, 1, hidden)
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: torch.Tensor,  # (B, 1, 1, L) fp32: 0 where a slot attends, -inf elsewhere
        rows: slice,  # the B consecutive slots first..first+B-1
        positions: torch.Tensor,  # (B,) where each slot writes its new key and value
        k_cache: torch.Tensor | None,
        v_cache: torch.Tensor | None,
    ) -> torch.Tensor:
        if layer.qkv is not None:
            B, L = x.shape[0], bias.shape[-1]
            nkv, group = self.n_kv_heads, self.n_heads // self.n_kv_heads
            q, k, v = self._qkv(layer, x, cos, sin)
            slots = self.slot_ids[rows]
            k_cache[slots, :, positions] = k[:, :, 0].to(self.cache_dtype)
            v_cache[slots, :, positions] = v[:, :, 0].to(self.cache_dtype)
            # Attention of one query per slot, written out: at this size it is several times cheaper
            # than the SDPA kernel. Query heads are grouped by the KV head they share (as repeat_kv).
            q = q.reshape(B, nkv, group, self.head_dim).to(self.cache_dtype)
            scores = torch.matmul(q, k_cache[rows, :, :L].transpose(-1, -2))  # (B, nkv, group, L)
            probs = torch.add(bias, scores, alpha=self.scale).softmax(-1).to(self.cache_dtype)
            a = torch.matmul(probs, v_cache[rows, :, :L])  # (B, nkv, group, hd)
            x = x + layer.o(a.reshape(B, 1, -1).to(x.dtype))
        return self._mlp(layer, x)

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        for k_cache, v_cache in zip(self.k_cache, self.v_cache, strict=True):
            if k_cache is not None:
                k_cache[dst, :, :length] = k_cache[src, :, :length]
                v_cache[dst, :, :length] = v_cache[src, :, :length]
