"""Compact forward for Llama-family decoders (llama, mistral, qwen2) over a slot-based KV cache.

gpt-fast style: the weights come straight from the Hugging Face modules (q/k/v and gate/up are
fused by making the modules' weights views of one tensor, so no extra memory), the KV cache is
one preallocated buffer per layer, (slots, kv_heads, capacity, head_dim), written at each slot's
position, and a decode step is a fixed sequence of tensor ops over the first B slots with no
per-step Python objects. It mirrors the Hugging Face forward op for op (RMSNorm statistics in
fp32, rotary embeddings from the model's own module), so greedy tokens match `model.generate`.

bf16 on a CPU with bf16 instructions (AVX-512 BF16, AMX) runs the linear layers on oneDNN-blocked
copies of the weights: PyTorch's bf16 matrix-vector product runs at about half the speed of
oneDNN's on blocked weights, and the results are bit-identical. A served model keeps only the
blocked copies. A CPU without them (AVX2 only: AMD Zen 3, older Xeons) has no fast bf16 matrix
product at all: PyTorch's falls back to a scalar loop (a 128-token prefill of the default model
took 1.9 s). There, products of `WIDE_ROWS` rows or more run in fp32 on oneDNN-blocked fp32 copies
of the weights, rounded back to bf16 (what a bf16 product accumulating in fp32 computes, up to the
order of the sums), and smaller ones keep PyTorch's bf16 matrix-vector kernel, which reads half
the bytes. That costs twice the linear weights' bf16 size in memory.

A runner that compiles its decode steps (`compiled`) keeps the plain weights as well: the step of
one request computes each product as a sum over the input features in fp32, which Inductor
turns into one vectorised loop reading the bf16 weight at close to the memory's speed (about 1.5x
oneDNN's kernel). Its sums run in another order than oneDNN's, so a logit can differ in its last
bf16 bit and greedy tokens can part at near-ties. Decode steps of several requests compile as a
second graph for every batch size, whose products stay oneDNN's (behind an opaque op): it computes
what the eager step computes, bit for bit.

A layer whose attention was replaced by nothing (a depth-pruned FFN-only block; the variant
format knows which, `variants.noop.noop_layers`) runs only its MLP and keeps no cache.
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from service.engine.runner import Chunk, StepShortcuts, max_positions
from variants.noop import noop_layers

FAST_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2"})
CAPACITY_STEP = 256  # the cache grows in multiples of this many positions
SLOT_STEP = 8  # and in multiples of this many slots
ATTENTION_BUCKET = 64  # decode attends over the used positions rounded up to this
# What one more attention call per layer costs, in cache positions read by one row: a run of
# decode rows is split off only when that saves more padding than this.
RUN_COST = 256


# On a CPU without bf16 instructions, products of this many rows or more run in fp32 (the default
# model's decode step: 114 ms in bf16 against 139 ms in fp32 at 4 rows, 205 against 143 at 8).
WIDE_ROWS = 6

# blocked weight copies by (kind, device, dtype, shape, content digest), alive while some runner uses them
_BLOCKED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
# plain weights of the models runners own, by (device, dtype, shape, content digest)
_PLAIN: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _content_key(weight: torch.Tensor) -> tuple:
    w = weight.detach().contiguous()
    digest = hashlib.blake2b(w.view(torch.uint8).cpu().numpy()).digest()  # a GPU weight is read back once
    return (w.device, w.dtype, tuple(w.shape), digest)


def _shared(weight: torch.Tensor) -> torch.Tensor:
    """The process's tensor with `weight`'s content: `weight` itself unless an equal one is held.

    A variant serves beside its base model: the weights it did not change (a depth variant's
    layers, every variant's embeddings) are then held once.
    """
    return _PLAIN.setdefault(_content_key(weight), weight)


def _share_parameter(module: nn.Module, name: str) -> None:
    """Point `module.<name>` at the process's tensor of equal content (`_shared`)."""
    param = getattr(module, name)
    shared = _shared(param)
    if shared is not param:
        setattr(module, name, shared if isinstance(shared, nn.Parameter) else nn.Parameter(shared, requires_grad=False))


def _blocked(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A blocked copy of `weight` for one kernel: "onednn" (bf16), "mkl" (fp32) or "onednn-fp32"
    (a bf16 weight widened to fp32, blocked for products of 16 rows).

    Copies are shared by content across the process: a variant serves beside its base model, and
    the layers it did not change (most of a depth variant's) are then held once.
    """
    w = weight.detach().contiguous()
    key = (kind, *_content_key(w))
    blocked = _BLOCKED.get(key)
    if blocked is None:
        if kind == "onednn":
            blocked = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        elif kind == "mkl":
            blocked = torch.ops.mkl._mkl_reorder_linear_weight(w, 1)
        else:
            blocked = torch.ops.mkldnn._reorder_linear_weight(w.float(), 16)
        _BLOCKED[key] = blocked
    return blocked


def _onednn_linear(x: torch.Tensor, blocked: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's product with a weight `_blocked` for it."""
    return torch.ops.mkldnn._linear_pointwise(x, blocked, bias, "none", [], "")


# The same, as one opaque op in a compiled step: Inductor's own lowering of oneDNN's product takes
# the weight for a frozen constant, which a runner's weights are not.
blocked_linear = torch.library.custom_op("trimserve::blocked_linear", _onednn_linear, mutates_args=())


@blocked_linear.register_fake
def _(x: torch.Tensor, blocked: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], blocked.shape[0])


@dataclass(frozen=True)
class _Linear:
    weight: torch.Tensor | None  # None once released: a bf16 blocked copy alone is enough
    bias: torch.Tensor | None
    packed: torch.Tensor | None = None  # blocked copy of `weight` (oneDNN for bf16, MKL for fp32)
    wide: torch.Tensor | None = None  # fp32 blocked copy of a bf16 `weight`, for products of WIDE_ROWS rows
    wide_bias: torch.Tensor | None = None  # `bias` in fp32, for those products

    @classmethod
    def of(cls, module: nn.Linear, share: bool = False) -> _Linear:
        """`module`'s weights; with `share`, its weight is first pointed at an equal one held (`_shared`)."""
        if share:
            _share_parameter(module, "weight")
        return cls(module.weight, module.bias)

    def pack(self) -> _Linear:
        """This linear with a blocked weight copy (oneDNN for bf16, MKL for fp32)."""
        return replace(self, packed=_blocked(self.weight, "onednn" if self.weight.dtype == torch.bfloat16 else "mkl"))

    def widen(self) -> _Linear:
        """This bf16 linear with an fp32 blocked copy for wide products (a CPU without bf16 instructions)."""
        bias = None if self.bias is None else self.bias.detach().float()
        return replace(self, wide=_blocked(self.weight, "onednn-fp32"), wide_bias=bias)

    def released(self) -> _Linear:
        """Without its plain weight, when the blocked copy is all the bf16 kernel needs."""
        return replace(self, weight=None) if self.packed is not None and self.packed.dtype == torch.bfloat16 else self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and self.weight is not None and x.is_cpu and x.numel() == x.shape[-1]:
            # One row on CPU, compiled: a product written as a sum over the input features becomes
            # one vectorised loop that reads the weight at about 1.5x the speed of oneDNN's kernel,
            # summing in fp32 (in another order than a product kernel: the last bit can differ).
            y = (x.float().unsqueeze(-2) * self.weight.float()).sum(-1)
            return (y if self.bias is None else y + self.bias.float()).to(x.dtype)
        if self.wide is not None and x.numel() >= WIDE_ROWS * x.shape[-1]:
            return _onednn_linear(x.float(), self.wide, self.wide_bias).to(x.dtype)
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        if self.packed.dtype == torch.bfloat16:
            if torch.compiler.is_compiling():  # the wrapper costs 10 us a call: only where needed
                return blocked_linear(x, self.packed, self.bias)
            return _onednn_linear(x, self.packed, self.bias)
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, 1)


def can_pack(model: PreTrainedModel) -> bool:
    """Whether oneDNN blocked bf16 weights apply: bf16 weights on a CPU with bf16 support."""
    return _bf16_on_cpu(model) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def needs_widening(model: PreTrainedModel) -> bool:
    """Whether wide products run in fp32: bf16 weights on a CPU without bf16 instructions."""
    return _bf16_on_cpu(model) and not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _bf16_on_cpu(model: PreTrainedModel) -> bool:
    return model.device.type == "cpu" and model.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


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


def _fuse(modules: list[nn.Linear], share: bool = False) -> _Linear:
    """One linear computing `modules` side by side; their weights become views of the fused weight
    (with `share`: of an equal fused weight already held, `_shared`).

    The model keeps working (and uses no extra memory): each module's parameter now points
    into the fused tensor. Biases are fused too when every module has one.
    """
    weight = torch.cat([m.weight.detach() for m in modules])
    weight = _shared(weight) if share else weight
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


def _layer(layer: nn.Module, attention_free: bool, share: bool) -> _Layer:
    attn = None if attention_free else layer.self_attn
    mlp = layer.mlp
    return _Layer(
        attn_norm=_Norm.of(layer.input_layernorm) if attn is not None else None,
        qkv=_fuse([attn.q_proj, attn.k_proj, attn.v_proj], share) if attn is not None else None,
        o=_Linear.of(attn.o_proj, share) if attn is not None else None,
        mlp_norm=_Norm.of(layer.post_attention_layernorm),
        gate_up=_fuse([mlp.gate_proj, mlp.up_proj], share),
        down=_Linear.of(mlp.down_proj, share),
        act=F.silu if type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation") else mlp.act_fn,
    )


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as in Hugging Face's `apply_rotary_pos_emb`: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def decode_runs(lengths: list[int], bucket: int = ATTENTION_BUCKET, cost: int = RUN_COST) -> list[tuple[int, int, int]]:
    """Split decode rows 0..B-1 (row b attends over lengths[b] positions) into runs of consecutive
    rows (start, stop, L), each attending over its longest length rounded up to `bucket`.

    Minimises the positions read (rows x L summed over runs) plus `cost` per run, so one long
    request no longer makes every short one in the batch pay for its length. O(B^2), once per step.
    """
    padded = [-(-n // bucket) * bucket for n in lengths]
    best = [0] + [float("inf")] * len(lengths)
    cut = [0] * (len(lengths) + 1)
    for stop in range(1, len(lengths) + 1):
        longest = 0
        for start in range(stop - 1, -1, -1):
            longest = max(longest, padded[start])
            total = best[start] + (stop - start) * longest + cost
            if total < best[stop]:
                best[stop], cut[stop] = total, start
    runs, stop = [], len(lengths)
    while stop:
        start = cut[stop]
        runs.append((start, stop, max(padded[start:stop])))
        stop = start
    return runs[::-1]


@dataclass(frozen=True)
class _DecodeRun:
    start: int  # its first row in the decode batch
    slot: int  # and that row's cache slot; the rows that follow use the slots that follow
    positions: torch.Tensor  # (rows,) where each writes its new key and value
    bias: torch.Tensor  # (rows, 1, 1, L) fp32: 0 where a row attends, -inf elsewhere


def _each_linear(layer: _Layer, fn: Callable[[_Linear], _Linear]) -> _Layer:
    def apply(linear: _Linear | None) -> _Linear | None:
        return fn(linear) if linear is not None else None

    return replace(layer, qkv=apply(layer.qkv), o=apply(layer.o), gate_up=fn(layer.gate_up), down=fn(layer.down))


def release_linear_weights(model: PreTrainedModel) -> None:
    """Empty the Hugging Face model's linear weights (the runner keeps its own blocked copies).

    Halves the memory of a bf16 model served on CPU; the model cannot run its own forward after
    this, so only a runner that owns its model does it. A tied output head stays (it is the
    embedding the runner reads).
    """
    embedding = model.get_input_embeddings().weight
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight is not embedding:
            module.weight = nn.Parameter(module.weight.new_empty(0), requires_grad=False)


def compile_unavailable(device: torch.device) -> str | None:
    """Why a decode step cannot be compiled for `device` on this host, or None if it can."""
    if device.type != "cpu":
        return None
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as err:  # Inductor's own search: $CXX, else g++
        return f"a compiled decode step on CPU needs a C++ compiler: {err}"
    return None


def compile_options(device: torch.device, one_row: bool = False) -> dict:
    """Inductor's options for a decode step on `device` (`one_row`: of one request)."""
    options = {"emulate_precision_casts": True}
    if one_row and device.type == "cpu":  # Inductor would inline each RMSNorm into the one-row
        options["realize_opcount_threshold"] = 1  # product after it, recomputing it for every output
    if device.type == "cuda":  # a decode step is hundreds of small kernels: launched as one CUDA graph,
        options["triton.cudagraphs"] = True  # recorded once for each batch size and attention length
    return options


def _compile(forward: Callable, device: torch.device, one_row: bool = False) -> Callable:
    """`forward` compiled for decode steps (`one_row`: of one request). It rounds where eager rounds
    (bf16 included); only one-row products on CPU sum in another order (`_Linear.__call__`)."""
    problem = compile_unavailable(device)
    if problem is not None:
        raise ValueError(problem)
    options = compile_options(device, one_row)
    return torch.compile(forward, fullgraph=True, dynamic=False, options=options)


class LlamaRunner(StepShortcuts):
    """Batched decode and chunked prefill for a Llama-family model over `max_slots` cache slots.

    `pack` and `widen` (default: what this CPU calls for, `can_pack` and `needs_widening`) choose
    the kernels of the linear layers. `release`: the runner owns the model, which nothing else
    changes: it frees the model's plain weights where the blocked bf16 copies replace them, and
    points the others at equal ones another owning runner holds (a variant's unchanged layers and
    embeddings). `compiled` compiles decode steps: those of one request, and those of several in
    one run from slot 0. `static_cache` (default: compiled on a GPU, where those steps replay as
    CUDA graphs, which read and write fixed addresses) allocates the whole cache up front, at
    `max_slots` slots of `max_seq` positions, instead of growing it with use.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        max_slots: int,
        max_seq: int,
        pack: bool | None = None,
        release: bool = False,
        widen: bool | None = None,
        compiled: bool = False,
        static_cache: bool | None = None,
    ) -> None:
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
        if release:  # an owned model's weights are pointed at equal ones held already (`_shared`)
            tied = model.lm_head.weight is inner.embed_tokens.weight
            _share_parameter(inner.embed_tokens, "weight")
            if tied:
                model.lm_head.weight = inner.embed_tokens.weight
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        attention_free = set(noop_layers(model))
        self.layers = [
            _layer(layer, i in attention_free, release)
            for i, layer in enumerate(inner.layers[: config.num_hidden_layers])
        ]
        self.norm = _Norm.of(inner.norm)
        self.lm_head = _Linear.of(model.lm_head, release)
        # bf16 on CPU: PyTorch's own bf16 matrix-vector product reaches about half the bandwidth
        # of oneDNN's with pre-blocked weights. The blocked copies cost one more copy of the weights.
        self.packed = can_pack(model) if pack is None else pack
        if self.packed:
            self.layers = [_each_linear(layer, _Linear.pack) for layer in self.layers]
            self.lm_head = self.lm_head.pack()
        widened = needs_widening(model) if widen is None else widen
        if widened:
            self.layers = [_each_linear(layer, _Linear.widen) for layer in self.layers]
            self.lm_head = self.lm_head.widen()
        # A compiled decode step reads the plain weights (`_Linear.__call__`): a compiling runner keeps them.
        if release and self.packed and self.dtype == torch.bfloat16 and not compiled:
            self.layers = [_each_linear(layer, _Linear.released) for layer in self.layers]
            if self.lm_head.weight is not self.embed:
                self.lm_head = self.lm_head.released()
            release_linear_weights(model)
        # Opt-in (`compiled`): decode steps of one request run as one compiled function. Eager, such
        # a step dispatches about 4,900 small ops, which take as long as reading the weights;
        # Inductor fuses them, and turns each product into a loop that reads the weight near the
        # memory's speed. Decode steps of several requests in one run from slot 0 run as a second
        # one (for any number of rows), unless products switch kernels with the row count
        # (`widen`). Each compiles on its first step (a minute or two on 2 cores).
        self._compiled_decode = _compile(self._forward, self.device, one_row=True) if compiled else None
        self._compiled_batch = _compile(self._decode_batch, self.device) if compiled and not widened else None
        # It would be specialised on whether the positions attended reach the cache's capacity: with
        # one attention bucket of headroom they never do.
        self.headroom = ATTENTION_BUCKET if compiled else 0
        self.capacity = 0
        self.slots = 0  # slots the cache holds now (it grows to max_slots as load needs them)
        self.k_cache: list[torch.Tensor | None] = []
        self.v_cache: list[torch.Tensor | None] = []
        self.static_cache = (compiled and self.device.type == "cuda") if static_cache is None else static_cache
        with torch.inference_mode():  # as when a step grows it: a compiled step sees one kind of tensor
            if self.static_cache:
                self._grow(self.max_seq, max_slots)
                for cache in self._caches():  # a graph may write into it in place of a copy
                    torch._dynamo.mark_static_address(cache)
            else:
                self._grow(min(CAPACITY_STEP, self.max_seq), 1)
        self.slot_ids = torch.arange(max_slots, device=self.device)
        self.positions = torch.arange(self.max_seq + self.headroom, device=self.device)

    @property
    def cache_bytes(self) -> int:
        """Bytes the KV cache holds now."""
        return sum(t.numel() * t.element_size() for t in self._caches())

    def _caches(self) -> list[torch.Tensor]:
        """Every layer's key cache, then every layer's value cache (layers without attention have none)."""
        return [c for c in (*self.k_cache, *self.v_cache) if c is not None]

    def _grow(self, positions: int, slots: int) -> None:
        """Make the cache hold at least `positions` positions (and its headroom) in `slots` slots,
        copying what it holds."""
        if positions + self.headroom <= self.capacity and slots <= self.slots:
            return
        if positions > self.max_seq:
            raise ValueError(f"{positions} positions exceed the cache limit of {self.max_seq}")
        if slots > self.max_slots:
            raise ValueError(f"slot {slots - 1} is beyond the {self.max_slots} slots")
        capacity = max(self.capacity, min(self.max_seq, -(-positions // CAPACITY_STEP) * CAPACITY_STEP) + self.headroom)
        held = max(self.slots, min(self.max_slots, -(-slots // SLOT_STEP) * SLOT_STEP))
        shape = (held, self.n_kv_heads, capacity, self.head_dim)
        k_cache, v_cache = [], []
        for i, layer in enumerate(self.layers):
            if layer.qkv is None:
                k_cache.append(None)
                v_cache.append(None)
                continue
            k = torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
            if self._compiled_decode is not None and not self.static_cache:  # not specialised to the cache's size
                for t in (k, v):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                    torch._dynamo.maybe_mark_dynamic(t, 2)
            if self.capacity:
                k[: self.slots, :, : self.capacity] = self.k_cache[i]
                v[: self.slots, :, : self.capacity] = self.v_cache[i]
            k_cache.append(k)
            v_cache.append(v)
        self.k_cache, self.v_cache, self.capacity, self.slots = k_cache, v_cache, capacity, held

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
    def step(
        self, tokens: torch.Tensor, positions: torch.Tensor, chunks: Sequence[Chunk] = (), first: int = 0
    ) -> torch.Tensor:
        B = tokens.shape[0]
        self._grow(
            max([int(positions.max()) + 1 if B else 0, *(c.end for c in chunks)]),
            max([first + B, *(c.slot + 1 for c in chunks)]),
        )
        # One sequence of N tokens: the B decode tokens, then every chunk's prompt tokens. The linear
        # layers see all N at once (each weight is read once per step); attention is per part.
        ids = torch.tensor([t for c in chunks for t in c.ids], dtype=torch.long, device=self.device)
        at = torch.cat([positions.to(self.device), *(self.positions[c.start : c.end] for c in chunks)])
        x = F.embedding(torch.cat([tokens.to(self.device), ids]), self.embed).unsqueeze(0)  # (1, N, hidden)
        cos, sin = self.rotary(x, at.unsqueeze(0))
        runs = [self._decode_run(first, positions, i, j, L) for i, j, L in decode_runs((positions + 1).tolist())]
        if self.static_cache:  # a CUDA graph's outputs live until its next replay: the last step's are read
            torch.compiler.cudagraph_mark_step_begin()
        if self._compiled_decode is not None and B == 1 and first == 0 and not chunks:  # one request decoding
            return self._compiled_decode(x, cos, sin, B, runs, ())  # always a tuple: its type is guarded on
        if self._compiled_batch is not None and first == 0 and not chunks and len(runs) == 1:
            for t in (x, cos, sin):
                torch._dynamo.maybe_mark_dynamic(t, 1)  # one compile for every batch size
            return self._compiled_batch(x, cos, sin, runs[0])
        return self._forward(x, cos, sin, B, runs, chunks)

    def _decode_batch(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, run: _DecodeRun) -> torch.Tensor:
        """`_forward` for a decode step of several requests in one run, sized by its tensors."""
        return self._forward(x, cos, sin, x.shape[1], [run], ())

    def _forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        B: int,
        runs: list[_DecodeRun],
        chunks: Sequence[Chunk],
    ) -> torch.Tensor:
        """Every layer over the step's N tokens (B decoding rows attending in `runs`, then the
        chunks); the logits of each decoding row and of each chunk's last token."""
        for layer, k_cache, v_cache in zip(self.layers, self.k_cache, self.v_cache, strict=True):
            if layer.qkv is not None:
                q, k, v = self._qkv(layer, x, cos, sin)  # (1, heads, N, head_dim)
                parts = [self._decode_attention(q[0, :, :B], k[0, :, :B], v[0, :, :B], runs, k_cache, v_cache)]
                offset = B
                for c in chunks:
                    n = len(c.ids)
                    part = slice(offset, offset + n)
                    parts.append(
                        self._chunk_attention(c, q[:, :, part], k[:, :, part], v[:, :, part], k_cache, v_cache)
                    )
                    offset += n
                x = x + layer.o(torch.cat(parts).unsqueeze(0))
            x = self._mlp(layer, x)
        if not chunks:
            return self.lm_head(self.norm(x[0, :B]))
        last = list(range(B)) + [B + end - 1 for end in itertools.accumulate(len(c.ids) for c in chunks)]
        return self.lm_head(self.norm(x[0, last]))

    def _decode_run(self, first: int, positions: torch.Tensor, i: int, j: int, L: int) -> _DecodeRun:
        """Rows i..j-1 of the decode batch, attending over L cache positions (a -inf bias beyond each row's own)."""
        L = min(L, self.capacity)
        at = positions[i:j].to(self.device, copy=True)  # an inference tensor whoever calls: one kind to compile for
        visible = self.positions[:L].unsqueeze(0) <= at.unsqueeze(1)  # (rows, L)
        bias = torch.zeros(j - i, 1, 1, L, dtype=torch.float32, device=self.device)
        bias.masked_fill_(~visible.view(j - i, 1, 1, L), float("-inf"))
        if self._compiled_decode is not None:  # nor to the positions attended, nor to the rows
            torch._dynamo.maybe_mark_dynamic(bias, 3)
            torch._dynamo.maybe_mark_dynamic(bias, 0)
            torch._dynamo.maybe_mark_dynamic(at, 0)
        return _DecodeRun(i, first + i, at, bias)

    def _decode_attention(
        self,
        q: torch.Tensor,  # (heads, B, head_dim)
        k: torch.Tensor,  # (kv_heads, B, head_dim)
        v: torch.Tensor,
        runs: list[_DecodeRun],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """One query per slot over its cached positions; (B, heads * head_dim) in the model's dtype."""
        nkv, group, B = self.n_kv_heads, self.n_heads // self.n_kv_heads, q.shape[1]
        out = []
        for run in runs:
            n = run.positions.shape[0]  # the run's sizes come from its tensors: a compiled step is not
            rows, cached = slice(run.start, run.start + n), slice(run.slot, run.slot + n)  # specialised to them
            slots = self.slot_ids[cached]
            k_cache[slots, :, run.positions] = k[:, rows].transpose(0, 1).to(self.cache_dtype)
            v_cache[slots, :, run.positions] = v[:, rows].transpose(0, 1).to(self.cache_dtype)
            # Written out: at this size several times cheaper than the SDPA kernel. Query heads are
            # grouped by the KV head they share (as repeat_kv).
            L = run.bias.shape[-1]
            qr = q[:, rows].transpose(0, 1).reshape(-1, nkv, group, self.head_dim).to(self.cache_dtype)
            scores = torch.matmul(qr, k_cache[cached, :, :L].transpose(-1, -2))  # (rows, nkv, group, L)
            probs = torch.add(run.bias, scores, alpha=self.scale).softmax(-1).to(self.cache_dtype)
            out.append(torch.matmul(probs, v_cache[cached, :, :L]).reshape(-1, self.n_heads * self.head_dim))
        return torch.cat(out).to(q.dtype) if out else q.new_empty(B, self.n_heads * self.head_dim)

    def _chunk_attention(
        self,
        chunk: Chunk,
        q: torch.Tensor,  # (1, heads, n, head_dim)
        k: torch.Tensor,  # (1, kv_heads, n, head_dim)
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """Causal attention of a prompt chunk over its slot; (n, heads * head_dim) in the model's dtype."""
        n, start, end = q.shape[2], chunk.start, chunk.end
        k_cache[chunk.slot, :, start:end] = k[0]
        v_cache[chunk.slot, :, start:end] = v[0]
        if start == 0:  # the whole prompt so far is this chunk: attend in the model's dtype, as `generate`
            a = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1, scale=self.scale, enable_gqa=True)
        else:  # later chunks also see the cached positions before them
            mask = self.positions[:end].unsqueeze(0) <= self.positions[start:end].unsqueeze(1)  # (n, end)
            keys, values = k_cache[chunk.slot : chunk.slot + 1, :, :end], v_cache[chunk.slot : chunk.slot + 1, :, :end]
            a = F.scaled_dot_product_attention(
                q.to(self.cache_dtype), keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True
            ).to(q.dtype)
        return a[0].transpose(0, 1).reshape(n, -1)

    @torch.inference_mode()
    def logits(self, ids: list[int], keep: int) -> torch.Tensor:
        """Logits of the last `keep` positions of `ids` in one forward that leaves the cache alone."""
        T = len(ids)
        x = F.embedding(torch.tensor([ids], dtype=torch.long, device=self.device), self.embed)
        cos, sin = self.rotary(x, torch.arange(T, device=self.device).unsqueeze(0))
        for layer in self.layers:
            if layer.qkv is not None:
                q, k, v = self._qkv(layer, x, cos, sin)
                a = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scale, enable_gqa=True)
                x = x + layer.o(a.transpose(1, 2).reshape(1, T, -1))
            x = self._mlp(layer, x)
        return self.lm_head(self.norm(x[0, -keep:]))

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        for k_cache, v_cache in zip(self.k_cache, self.v_cache, strict=True):
            if k_cache is not None:
                k_cache[dst, :, :length] = k_cache[src, :, :length]
                v_cache[dst, :, :length] = v_cache[src, :, :length]

    @torch.inference_mode()
    def save(self, slot: int, length: int) -> tuple[list[torch.Tensor], int]:
        """The slot's first `length` positions in the model's dtype: every key and value was computed in
        it (the cache only widens them), so the copy loses nothing and takes half the fp32 bytes."""
        kept = [c[slot, :, :length].to(self.dtype, copy=True) for c in self._caches()]
        return kept, sum(t.numel() * t.element_size() for t in kept)

    @torch.inference_mode()
    def restore(self, saved: list[torch.Tensor], slot: int, length: int) -> None:
        self._grow(length, slot + 1)
        for cache, kept in zip(self._caches(), saved, strict=True):
            cache[slot, :, :length] = kept[:, :length]
