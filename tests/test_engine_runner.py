"""Runners: greedy tokens equal `model.generate`, alone and in batches of mixed prompt lengths."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.cpp_builder

from service.backend import SamplingParams
from service.engine.engine import make_runner
from service.engine.llama import (
    SLOT_STEP,
    WIDE_ROWS,
    LlamaRunner,
    can_pack,
    compile_options,
    decode_runs,
    needs_widening,
    unsupported_reason,
)
from service.engine.runner import MAX_AUTO_SLOTS, Chunk, HFRunner, kv_bytes_per_position, slots_for_memory
from service.engine.sampling import make_generator, sample_one, top_p_filter
from tests.test_service_loadgen import no_cpp_compiler
from tests.tiny_models import TINY_VOCAB, tiny_llama, tiny_opt, tiny_qwen2


def reference(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=2)
    return out[0, len(prompt) :].tolist()


def prompts(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 40000, (n,), generator=g).tolist() for n in lengths]


def greedy_batch(runner, batch: list[list[int]], n: int) -> list[list[int]]:
    outs = [[int(runner.prefill(slot, p).argmax())] for slot, p in enumerate(batch)]
    for _ in range(n - 1):
        tokens = torch.tensor([o[-1] for o in outs])
        positions = torch.tensor([len(p) + len(o) - 1 for p, o in zip(batch, outs, strict=True)])
        for o, t in zip(outs, runner.decode(tokens, positions).argmax(-1).tolist(), strict=True):
            o.append(t)
    return outs


def profiled_calls(fn, event: str) -> int:
    """How many times `fn` records a profiler event whose name starts with `event`."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith(event))


def test_fast_path_selection(tiny_model) -> None:
    runner = make_runner(tiny_model, 2, 64)
    expected = HFRunner if tiny_model.config.model_type == "opt" else LlamaRunner
    assert isinstance(runner, expected)


def test_greedy_matches_generate_single_and_batched(tiny_model) -> None:
    batch = prompts((5, 23, 11, 1))
    runner = make_runner(tiny_model, 4, 128)
    expected = [reference(tiny_model, p, 12) for p in batch]
    assert greedy_batch(runner, batch[:1], 12) == expected[:1]
    assert greedy_batch(runner, batch, 12) == expected


def test_move_keeps_a_request_intact() -> None:
    model = tiny_llama()
    runner = make_runner(model, 3, 128)
    a, b = prompts((7, 13), seed=1)
    runner.prefill(0, a)
    first = int(runner.prefill(2, b).argmax())
    runner.move(2, 1, len(b))
    runner.prefill(0, prompts((3,), seed=2)[0])  # slot 0 overwritten by someone else
    logits = runner.decode(torch.tensor([0, first]), torch.tensor([3, len(b)]))
    assert int(logits[1].argmax()) == reference(model, b, 2)[1]


def test_cache_grows_past_its_first_capacity() -> None:
    model = tiny_llama()
    runner = LlamaRunner(model, 2, 512)
    assert runner.capacity == 256
    prompt = prompts((250,), seed=3)[0]
    assert greedy_batch(runner, [prompt], 12) == [reference(model, prompt, 12)]
    assert runner.capacity == 512


def test_layer_without_attention_runs_its_mlp_only() -> None:
    from pruning.depth.ffn import make_noop

    model = tiny_llama()
    make_noop(model.model.layers[1], 1)
    assert unsupported_reason(model) is None
    runner = make_runner(model, 2, 64)
    x = torch.randn(1, 3, 64)
    layer = model.model.layers[1]
    h = layer.post_attention_layernorm(x)
    expected = x + layer.mlp(h)
    assert torch.allclose(runner._mlp(runner.layers[1], x), expected)
    assert runner.k_cache[1] is None


def test_unsupported_architecture_uses_generic_runner() -> None:
    assert "opt" in unsupported_reason(tiny_opt())
    assert isinstance(make_runner(tiny_llama(), 2, 64, fast=False), HFRunner)


def test_top_p_keeps_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = top_p_filter(logits, 0.7).isfinite().tolist()
    assert kept == [True, True, False, False]
    assert top_p_filter(logits, 0.01).isfinite().tolist() == [True, False, False, False]


def test_seeded_sampling_is_reproducible() -> None:
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    logits = torch.randn(3, 100)
    first = [sample_one(row, params, make_generator(params)) for row in logits]
    again = [sample_one(row, params, make_generator(params)) for row in logits]
    assert first == again
    assert make_generator(SamplingParams(temperature=0)) is None


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sample_shapes(temperature: float) -> None:
    params = SamplingParams(temperature=temperature, seed=1)
    tokens = [sample_one(row, params, make_generator(params)) for row in torch.randn(2, 50)]
    assert len(tokens) == 2 and all(0 <= t < 50 for t in tokens)


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-8, 2.0])
@pytest.mark.parametrize("top_p", [1.0, 1e-9])
def test_extreme_but_valid_sampling_settings_give_a_token(temperature: float, top_p: float) -> None:
    """A tiny temperature used to overflow logits / T to inf, and softmax to NaN (issue 13)."""
    logits = torch.randn(50) * 30
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=3)
    token = sample_one(logits.to(torch.bfloat16), params, make_generator(params))
    assert 0 <= token < 50
    if temperature < 1e-6 or top_p < 1e-6:
        assert token == int(logits.to(torch.bfloat16).argmax())


def test_ffn_replacement_layers_match_generate() -> None:
    from pruning.depth.ffn import make_noop

    model = tiny_llama()
    make_noop(model.model.layers[0], 0)
    make_noop(model.model.layers[2], 2)
    runner = make_runner(model, 2, 128)
    assert isinstance(runner, LlamaRunner) and runner.k_cache[0] is None
    batch = prompts((6, 14), seed=8)
    assert greedy_batch(runner, batch, 8) == [reference(model, p, 8) for p in batch]


def test_packed_bf16_weights_give_the_same_logits() -> None:
    model = tiny_llama().to(torch.bfloat16)
    if not can_pack(model):
        pytest.skip("no oneDNN bf16 support on this CPU")
    packed, plain = LlamaRunner(model, 2, 64, pack=True), LlamaRunner(model, 2, 64, pack=False)
    ids = prompts((9,), seed=10)[0]
    assert torch.equal(packed.prefill(0, ids), plain.prefill(0, ids))
    step = (torch.tensor([5]), torch.tensor([9]))
    assert torch.equal(packed.decode(*step), plain.decode(*step))


def test_packed_fp32_weights_are_close() -> None:
    model = tiny_llama()
    assert not can_pack(model)  # fp32 packing is opt-in: MKL's blocked kernels round differently
    packed, plain = LlamaRunner(model, 2, 64, pack=True), LlamaRunner(model, 2, 64, pack=False)
    ids = prompts((9,), seed=10)[0]
    assert torch.allclose(packed.prefill(0, ids), plain.prefill(0, ids), atol=1e-4)


def test_wide_bf16_products_run_in_fp32_and_round_back() -> None:
    """The path for CPUs without bf16 instructions, forced on any CPU: products of WIDE_ROWS rows or
    more use the fp32 copies (bf16 up to the order of the sums), smaller ones the bf16 kernel."""
    model, twin = tiny_llama().to(torch.bfloat16), tiny_llama().to(torch.bfloat16)
    assert not (can_pack(model) and needs_widening(model))  # one path per CPU
    wide, plain = LlamaRunner(model, 8, 64, pack=False, widen=True), LlamaRunner(model, 8, 64, pack=False, widen=False)
    assert wide.layers[1].gate_up.wide.dtype == torch.float32 and plain.layers[1].gate_up.wide is None
    assert LlamaRunner(twin, 2, 64, pack=False, widen=True).layers[1].gate_up.wide is wide.layers[1].gate_up.wide
    short, long = prompts((WIDE_ROWS - 1, 2 * WIDE_ROWS), seed=11)

    def oneDNN_calls(fn) -> int:
        return profiled_calls(fn, "mkldnn::_linear_pointwise")

    assert oneDNN_calls(lambda: wide.prefill(0, short)) == 0  # below WIDE_ROWS: the bf16 kernel
    assert oneDNN_calls(lambda: wide.prefill(1, long)) == 4 * 4  # each layer's four products; the head has one row
    assert torch.equal(wide.prefill(0, short), plain.prefill(0, short))
    got, expected = wide.prefill(1, long), plain.prefill(1, long)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), expected.float(), atol=0.05, rtol=0.02)
    batch = prompts((3, 9, 5, 12, 7, 4, 10, 6), seed=12)  # decode steps of 8 rows: the fp32 products
    assert greedy_batch(wide, batch, 4) == greedy_batch(plain, batch, 4)
    qwen = tiny_qwen2().to(torch.bfloat16)  # q/k/v with biases, added in fp32 on this path
    got = LlamaRunner(qwen, 2, 64, pack=False, widen=True).prefill(0, long)
    expected = LlamaRunner(qwen, 2, 64, pack=False, widen=False).prefill(0, long)
    assert torch.allclose(got.float(), expected.float(), atol=0.05, rtol=0.02)


def test_compiled_decode_steps_follow_generate_without_recompiling() -> None:
    """`compiled`: decode steps of one request (slot 0) run one compiled function, and those of
    several requests in one run from slot 0 another; each compiles once for every attended length,
    cache capacity, slot count and batch size. Other steps stay eager."""
    model = tiny_llama()
    runner = LlamaRunner(model, 20, 512, compiled=True)
    eager = LlamaRunner(tiny_llama(), 20, 512)
    prompt, other = prompts((200, 6), seed=30)
    expected = reference(model, prompt, 80)  # position 280: the cache grows past its first capacity

    def compiled_calls(fn) -> int:
        return profiled_calls(fn, "Torch-Compiled Region")

    out = [int(runner.prefill(0, prompt).argmax())]
    eager.prefill(0, prompt)

    def decode_one() -> None:
        out.append(int(runner.decode(torch.tensor([out[-1]]), torch.tensor([len(prompt) + len(out) - 1])).argmax()))

    eager.decode(torch.tensor([out[-1]]), torch.tensor([len(prompt)]))  # the same step, eager
    assert compiled_calls(decode_one) == 1  # the first compile
    mates = prompts((190, 190), seed=31)  # close enough to the first request's length for one run
    for slot, mate in enumerate(mates, start=1):
        assert compiled_calls(lambda s=slot, m=mate: runner.prefill(s, m)) == 0  # a prompt: eager
        eager.prefill(slot, mate)
    for i, size in enumerate((2, 3, 2)):  # the first request in slot 0 and 1-2 more beside it
        step = (torch.tensor([out[-1], 7, 7][:size]), torch.tensor([len(prompt) + len(out) - 1, 190, 190][:size]))
        got: list[torch.Tensor] = []
        with torch._dynamo.config.patch(error_on_recompile=i > 0):  # the first batched step compiles
            assert compiled_calls(lambda s=step, g=got: g.append(runner.decode(*s))) == 1
        assert torch.allclose(got[0], eager.decode(*step), atol=1e-5, rtol=1e-5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert compiled_calls(lambda: runner.prefill(12, other)) == 0  # (and 8 more slots)
        assert compiled_calls(lambda: runner.decode(torch.tensor([7]), torch.tensor([6]), first=12)) == 0
        assert compiled_calls(lambda: runner.decode(torch.tensor([7, 7]), torch.tensor([6, 6]), first=1)) == 0
        capacity = runner.capacity
        with torch.inference_mode():  # as the engine calls it: in inference mode, with a list of chunks
            step = (torch.tensor([out[-1]]), torch.tensor([len(prompt) + len(out) - 1]), [])
            assert compiled_calls(lambda: out.append(int(runner.step(*step).argmax()))) == 1
        while len(out) < len(expected):
            assert compiled_calls(decode_one) == 1
            if len(out) == 70:  # four requests of very different lengths: two runs, eager
                long_and_short = (torch.tensor([out[-1], 7, 7, 7]), torch.tensor([len(prompt) + len(out) - 1, 6, 6, 6]))
                assert compiled_calls(lambda s=long_and_short: runner.decode(*s)) == 0
                near = (torch.tensor([out[-1], 7]), torch.tensor([len(prompt) + len(out) - 1, 260]))
                assert compiled_calls(lambda s=near: runner.decode(*s)) == 1  # one run, past the cache's growth
    assert runner.capacity > capacity and runner.slots == 16
    assert out == expected


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])  # qwen2: q/k/v biases
def test_the_servers_bf16_runner_compiles_its_decode_steps(make_model) -> None:
    """A server's runner owns a bf16 model and computes batches on blocked (or widened) copies of
    its weights. Compiling, it keeps the plain weights, which its one-request step reads as sums
    Inductor fuses (summed in another order: logits within bf16 rounding of the eager step's); its
    batched steps compute what the eager ones do, bit for bit."""
    eager = LlamaRunner(make_model().to(torch.bfloat16), 2, 256, release=True)
    compiled = LlamaRunner(make_model().to(torch.bfloat16), 2, 256, release=True, compiled=True)
    assert all(linear.weight is not None for layer in compiled.layers for linear in (layer.qkv, layer.gate_up))
    prompt, mate = prompts((20, 18), seed=31)
    token = int(eager.prefill(0, prompt).argmax())
    assert int(compiled.prefill(0, prompt).argmax()) == token
    for position in range(len(prompt), len(prompt) + 12):
        step = (torch.tensor([token]), torch.tensor([position]))
        expected = eager.decode(*step)
        got: list[torch.Tensor] = []
        assert profiled_calls(lambda s=step, g=got: g.append(compiled.decode(*s)), "Torch-Compiled Region") == 1
        assert torch.allclose(got[0].float(), expected.float(), atol=0.05, rtol=0.02)
        token = int(expected.argmax())
    for runner in (eager, compiled):
        runner.prefill(1, mate)
    batch = (torch.tensor([token, 9]), torch.tensor([len(prompt) + 12, len(mate)]))
    expected = eager.decode(*batch)
    got = []
    assert profiled_calls(lambda: got.append(compiled.decode(*batch)), "Torch-Compiled Region") == int(
        compiled._compiled_batch is not None  # not where products switch kernels with the row count
    )
    assert torch.equal(got[0], expected)


def test_a_static_cache_is_whole_from_the_start_and_compiled_steps_keep_its_addresses() -> None:
    """What a GPU's CUDA graphs need (`static_cache`, the default when compiling there): the cache
    is allocated at every slot and position once, so the steps that write into it keep writing at
    the same addresses, and decode steps of any batch size and length follow `generate`."""
    model = tiny_llama()
    runner = LlamaRunner(model, 3, 300, compiled=True, static_cache=True)
    assert (runner.slots, runner.capacity) == (3, runner.max_seq + runner.headroom)
    addresses = [cache.data_ptr() for cache in runner._caches()]
    batch = prompts((40, 7, 25), seed=32)
    with torch._dynamo.config.patch(error_on_recompile=False):
        assert greedy_batch(runner, batch, 12) == [reference(model, p, 12) for p in batch]
        prompt = batch[0]
        out = reference(model, prompt, 1)
        runner.prefill(0, prompt)
        while len(out) < 70:  # one request past the first attention buckets
            out.append(int(runner.decode(torch.tensor([out[-1]]), torch.tensor([len(prompt) + len(out) - 1])).argmax()))
    assert out == reference(model, prompt, 70)
    assert [cache.data_ptr() for cache in runner._caches()] == addresses
    assert (runner.slots, runner.capacity) == (3, runner.max_seq + runner.headroom)
    assert LlamaRunner(tiny_llama(), 3, 300, compiled=True).static_cache is False  # on a CPU: grown with use
    assert LlamaRunner(tiny_llama(), 3, 300).capacity < 300


def test_decode_steps_compile_to_cuda_graphs_on_a_gpu_only() -> None:
    gpu, cpu = compile_options(torch.device("cuda")), compile_options(torch.device("cpu"), one_row=True)
    assert gpu["triton.cudagraphs"] and gpu["emulate_precision_casts"]
    assert "triton.cudagraphs" not in cpu and cpu["realize_opcount_threshold"] == 1


def test_a_compiled_decode_step_without_a_cpp_compiler_is_refused_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch._inductor.cpp_builder, "get_cpp_compiler", no_cpp_compiler)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        LlamaRunner(tiny_llama(), 2, 64, compiled=True)


def test_a_prompt_in_chunks_equals_the_whole_prompt() -> None:
    model = tiny_llama()
    runner = LlamaRunner(model, 2, 128)
    prompt = prompts((30,), seed=20)[0]
    whole = runner.prefill(0, prompt)
    none = torch.empty(0, dtype=torch.long)
    for start in range(0, 30, 7):
        last = runner.step(none, none, [Chunk(1, prompt[start : start + 7], start)])[0]
    assert torch.allclose(last, whole, atol=1e-5)
    first = int(last.argmax())
    logits = runner.decode(torch.tensor([first]), torch.tensor([30]), first=1)
    assert [first, int(logits[0].argmax())] == reference(model, prompt, 2)


def test_one_step_decodes_and_prefills_together(tiny_model) -> None:
    """Decode rows and prompt chunks of other slots in one forward give each request its own tokens."""
    runner = make_runner(tiny_model, 4, 128)
    a, b, c = prompts((9, 14, 21), seed=21)
    expected = [reference(tiny_model, p, 6) for p in (a, b, c)]
    outs = [[int(runner.prefill(0, a).argmax())]]
    # slot 0 decodes while b arrives whole and c's first half; then c's second half
    logits = runner.step(torch.tensor([outs[0][-1]]), torch.tensor([9]), [Chunk(1, b), Chunk(2, c[:10])])
    assert logits.shape[0] == 3
    outs[0].append(int(logits[0].argmax()))
    outs.append([int(logits[1].argmax())])
    logits = runner.step(torch.tensor([outs[0][-1], outs[1][-1]]), torch.tensor([10, 14]), [Chunk(2, c[10:], 10)])
    outs[0].append(int(logits[0].argmax()))
    outs[1].append(int(logits[1].argmax()))
    outs.append([int(logits[2].argmax())])
    while any(len(o) < 6 for o in outs):
        tokens = torch.tensor([o[-1] for o in outs])
        positions = torch.tensor([len(p) + len(o) - 1 for p, o in zip((a, b, c), outs, strict=True)])
        for o, t in zip(outs, runner.decode(tokens, positions).argmax(-1).tolist(), strict=True):
            o.append(t)
    assert [o[:6] for o in outs] == expected


def test_decode_runs_split_off_a_long_request_only_when_it_pays() -> None:
    assert decode_runs([]) == []
    assert decode_runs([100, 120, 90]) == [(0, 3, 128)]  # one bucket: one run
    # one 1,000-position request among short ones: reading 1,024 positions for every row costs more
    assert decode_runs([100, 1000, 90, 110]) == [(0, 1, 128), (1, 2, 1024), (2, 4, 128)]
    assert decode_runs([100, 200]) == [(0, 2, 256)]  # saving 128 positions is not worth a run


def test_the_cache_grows_its_slots_with_use() -> None:
    runner = LlamaRunner(tiny_llama(), 20, 64)
    assert runner.slots == SLOT_STEP and runner.k_cache[0].shape[0] == SLOT_STEP
    ids = prompts((5,), seed=22)[0]
    before = runner.prefill(3, ids)
    runner.prefill(12, ids)
    assert runner.slots == 16
    assert runner.cache_bytes == 4 * 2 * 16 * 2 * 64 * 16 * 4  # layers, keys and values, slots, heads, positions, dims
    assert torch.equal(
        runner.decode(torch.tensor([7]), torch.tensor([5]), first=3),
        runner.decode(torch.tensor([7]), torch.tensor([5]), first=12),
    )
    assert before.shape == (TINY_VOCAB,)
    runner.prefill(19, ids)
    assert runner.slots == 20
    with pytest.raises(ValueError, match="beyond the 20 slots"):
        runner.prefill(20, ids)


def test_slots_are_sized_from_the_memory_budget() -> None:
    model = tiny_llama()  # 4 layers x 2 KV heads x 16 dims x 2 (keys, values) x 4 bytes = 1 KiB per position
    assert kv_bytes_per_position(model) == 1024
    assert slots_for_memory(model, 256, budget=10 * 256 * 1024) == 10
    assert slots_for_memory(model, 256, budget=1) == 1  # always at least one
    assert slots_for_memory(model, 256, budget=1 << 40) == MAX_AUTO_SLOTS
    assert slots_for_memory(model, 10_000, budget=512 * 1024) == 1  # capped at the model's 512 positions
    assert slots_for_memory(model, 256) >= 1  # from this machine's free memory


def test_logits_of_a_whole_sequence_match_the_model_and_leave_the_cache(tiny_model) -> None:
    runner = make_runner(tiny_model, 2, 128)
    ids = prompts((12,), seed=23)[0]
    before = runner.prefill(0, ids[:5])
    with torch.no_grad():
        expected = tiny_model(torch.tensor([ids])).logits[0, -4:]
    assert torch.allclose(runner.logits(ids, 4), expected, atol=1e-4)
    with torch.no_grad():
        sixth = tiny_model(torch.tensor([ids[:6]])).logits[0, -1]
    # slot 0 still holds its 5 positions: decoding the sixth token there gives the model's logits
    assert torch.allclose(runner.decode(torch.tensor([ids[5]]), torch.tensor([5]))[0], sixth, atol=1e-4)
    assert torch.equal(runner.prefill(1, ids[:5]), before)


def test_a_runner_that_owns_its_bf16_model_frees_the_plain_weights() -> None:
    model, twin = tiny_llama().to(torch.bfloat16), tiny_llama().to(torch.bfloat16)
    if not can_pack(model):
        pytest.skip("no oneDNN bf16 support on this CPU")
    owner, keeper = LlamaRunner(model, 2, 64, release=True), LlamaRunner(twin, 2, 64)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert all(m.weight.numel() == 0 for m in linears if not (tied and m is model.lm_head))
    assert all(layer.gate_up.weight is None for layer in owner.layers)
    ids = prompts((9,), seed=24)[0]
    assert torch.equal(owner.prefill(0, ids), keeper.prefill(0, ids))
    step = (torch.tensor([5]), torch.tensor([9]))
    assert torch.equal(owner.decode(*step), keeper.decode(*step))
    assert torch.equal(owner.logits(ids, 3), keeper.logits(ids, 3))
    assert sum(m.weight.numel() for m in twin.modules() if isinstance(m, torch.nn.Linear)) > 0  # not asked: kept


def test_owning_runners_hold_a_variants_unchanged_weights_once() -> None:
    base, variant, twin = tiny_llama(), tiny_llama(), tiny_llama()  # fp32: plain weights on any CPU
    with torch.no_grad():
        for model in (variant, twin):
            model.model.layers[2].mlp.down_proj.weight.mul_(0.5)
    ids = torch.tensor([prompts((7,), seed=26)[0]])
    with torch.no_grad():
        expected = variant(ids).logits
    a, b = LlamaRunner(base, 2, 64, release=True), LlamaRunner(variant, 2, 64, release=True)
    assert a.layers[2].qkv.weight is b.layers[2].qkv.weight and a.layers[0].down.weight is b.layers[0].down.weight
    assert a.layers[2].down.weight is not b.layers[2].down.weight
    assert (
        variant.model.layers[0].self_attn.q_proj.weight.data_ptr()
        == base.model.layers[0].self_attn.q_proj.weight.data_ptr()
    )
    assert a.embed is b.embed is variant.model.embed_tokens.weight is variant.lm_head.weight  # the tie kept
    with torch.no_grad():
        assert torch.equal(variant(ids).logits, expected)  # the model itself still runs, unchanged
    alone = LlamaRunner(twin, 2, 64)  # not owned: left alone
    assert alone.layers[0].down.weight is not a.layers[0].down.weight
    assert torch.equal(b.prefill(0, ids[0].tolist()), alone.prefill(0, ids[0].tolist()))


def test_variants_share_the_blocked_copies_of_the_layers_they_did_not_change() -> None:
    base, variant = tiny_llama().to(torch.bfloat16), tiny_llama().to(torch.bfloat16)
    if not can_pack(base):
        pytest.skip("no oneDNN bf16 support on this CPU")
    with torch.no_grad():
        variant.model.layers[2].mlp.down_proj.weight.mul_(0.5)
    a, b = LlamaRunner(base, 2, 64, release=True), LlamaRunner(variant, 2, 64, release=True)
    assert a.layers[2].qkv.packed is b.layers[2].qkv.packed
    assert a.layers[0].down.packed is b.layers[0].down.packed
    assert a.layers[2].down.packed is not b.layers[2].down.packed
    ids = prompts((7,), seed=25)[0]
    fresh = LlamaRunner(tiny_llama().to(torch.bfloat16), 2, 64)  # the base again, not released
    assert torch.equal(a.prefill(0, ids), fresh.prefill(0, ids))
    assert not torch.equal(b.prefill(0, ids), fresh.prefill(0, ids))
