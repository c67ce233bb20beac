"""GemvLinear and compile() on language models: batch-1 layers equal their reference, generation with the
compiled model gives the uncompiled model's tokens (float32), the KV cache is untouched, and the 2:4 CUDA
path decides correctly (its GPU test skips without a GPU)."""

import pytest
import torch
from torch import nn

import prunekit.runtime as rt
from prunekit.calib.blocks import find_blocks, linear_layers, out_in_weight, set_out_in_weight
from prunekit.errors import PrunekitError
from prunekit.runtime import cuda, gemv
from prunekit.runtime.cpu import features
from prunekit.runtime.gemv import GemvLinear

transformers = pytest.importorskip("transformers")
from fixtures.hf import gpt2, llama, qwen2  # noqa: E402

FAST = dict(budget_s=0.005, min_reps=2, max_reps=3)
ISA_VIEWS = ["host"] + (["avx2,fma"] if features().avx512 else [])


def linear(w: torch.Tensor, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias:
            layer.bias.copy_(torch.linspace(-1, 1, w.shape[0]))
    return layer


def two_four(w: torch.Tensor) -> torch.Tensor:
    g = w.reshape(-1, 4).clone()
    g.scatter_(1, g.abs().argsort(dim=1)[:, :2], 0.0)
    return g.reshape(w.shape)


def blocks_of(w: torch.Tensor, rows: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    keep = (
        torch.rand(w.shape[0] // rows, w.shape[1], generator=torch.Generator().manual_seed(seed)) >= sparsity
    )
    return w * keep.repeat_interleave(rows, 0)


def prune_blocks(model: nn.Module, how: str) -> nn.Module:
    """Prune every decoder linear in place: ``2:4``, ``block`` (8x1, 70%) or ``unstructured`` (70%)."""
    torch.manual_seed(1)
    _, blocks = find_blocks(model)
    for block in blocks:
        for module in linear_layers(block).values():
            w = out_in_weight(module).clone()
            if how == "2:4":
                w = two_four(w)
            elif how == "block":
                w = blocks_of(w, 8, 0.7)
            else:
                w[w.abs() < w.abs().flatten().kthvalue(int(0.7 * w.numel())).values] = 0
            set_out_in_weight(module, w)
    return model.eval()


@pytest.fixture
def isa_view(request, monkeypatch):
    if request.param != "host":
        monkeypatch.setenv("PRUNEKIT_CPU_FEATURES", request.param)
    features.cache_clear()
    yield request.param
    features.cache_clear()


@pytest.mark.parametrize("isa_view", ISA_VIEWS, indirect=True)
@pytest.mark.parametrize("layout", ["dense", "block8", "nm2:4", "csr4"])
@pytest.mark.parametrize("values", ["float32", "bfloat16", "int8"])
def test_gemv_linear_matches_its_reference_at_batch_1_and_on_prompts(isa_view, layout, values):
    torch.manual_seed(0)
    w = two_four(blocks_of(torch.randn(24, 64), 8, 0.5))  # 2:4 and 8x1-blocky: every layout applies
    layer = GemvLinear(linear(w), layout, values)
    if layout == "nm2:4":
        assert layer.packed.params["isa"] == ("avx2" if isa_view != "host" else gemv.nm_isa())
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():
        y = layer(x)
        ref = layer.reference(x)
        assert y.shape == (1, 1, 24)
        assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()
        if values == "float32":
            assert (y - linear(w)(x)).abs().max() <= 1e-4 * ref.abs().max()
        prompt = torch.randn(1, 5, 64)  # several tokens: F.linear on the same weights
        assert torch.equal(layer(prompt), nn.functional.linear(prompt, layer.weight, layer.bias))


def test_int8_activations_are_bit_exact_and_need_int8_block_layouts():
    torch.manual_seed(2)
    lin = linear(blocks_of(torch.randn(32, 96), 8, 0.6))
    layer = GemvLinear(lin, "block8", "int8", "int8")
    assert layer.exact and layer.packed.layout == ("block-vnni" if features().vnni else "block")
    x = torch.randn(1, 96) * 5
    with torch.inference_mode():
        assert torch.equal(layer(x), layer.reference(x))
    generic = GemvLinear(lin, "block8", "int8", "int8", vnni=False)
    with torch.inference_mode():
        assert torch.equal(generic(x), layer(x))
    for bad in (dict(layout="csr4", values="int8"), dict(layout="block8", values="float32")):
        with pytest.raises(PrunekitError, match="int8 activations"):
            GemvLinear(lin, bad["layout"], bad["values"], "int8")


def test_two_threads_split_rows_and_give_the_same_output(monkeypatch):
    torch.manual_seed(3)
    lin = linear(blocks_of(torch.randn(1024, 512), 8, 0.5))
    monkeypatch.setattr(gemv.threads, "MIN_PARALLEL_WORK", 1)
    x = torch.randn(1, 512)
    for layout in ("dense", "block8", "csr4", "nm2:4"):
        w = two_four(lin.weight.detach()) if layout == "nm2:4" else lin.weight.detach()
        layer = GemvLinear(linear(w), layout)
        with torch.inference_mode():
            torch.set_num_threads(1)
            one = layer(x)
            torch.set_num_threads(2)
            try:
                two = layer(x)
            finally:
                torch.set_num_threads(1)
        assert len(layer._cuts[2]) == 3 and torch.equal(one, two)


def test_bad_layouts_and_values_are_one_line_errors():
    lin = linear(torch.randn(8, 32))
    with pytest.raises(PrunekitError, match="unknown layout"):
        GemvLinear(lin, "bcsr")
    with pytest.raises(PrunekitError, match="values must be one of"):
        GemvLinear(lin, "dense", "float16")
    with pytest.raises(PrunekitError, match="R in"):
        GemvLinear(lin, "block3")
    with pytest.raises(PrunekitError, match="not 2:4"):
        GemvLinear(lin, "nm2:4")
    with pytest.raises(PrunekitError, match="values must be one of"):
        rt.compile(nn.Sequential(lin), torch.randn(1, 32), values="fp8")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_candidates_follow_the_zero_pattern(one_thread):
    torch.manual_seed(4)
    dense = linear(torch.randn(64, 128))
    assert list(gemv.candidates(dense)) == ["gemv:dense"]
    blocky = linear(blocks_of(torch.randn(64, 128), 16, 0.7))
    offered = gemv.candidates(blocky)
    assert {"gemv:block4", "gemv:block8", "gemv:block16", "gemv:csr4"} <= set(offered)
    assert "gemv:nm2:4" not in offered
    nm = gemv.candidates(linear(two_four(torch.randn(64, 128))))
    assert "gemv:nm2:4" in nm and "gemv:block16" not in nm  # 2:4 zeros do not come in 16x1 blocks
    q = gemv.candidates(blocky, "int8", "int8")
    assert "gemv:block8/q8" in q


def test_with_two_threads_every_layout_is_also_offered_serial_and_computes_the_same(monkeypatch):
    """Waking a pool thread costs as much as a decode layer's product, so compile times each layout on one
    thread too; the serial layer splits nothing and gives the same bits (rows are independent)."""
    torch.manual_seed(5)
    monkeypatch.setattr(gemv.threads, "MIN_PARALLEL_WORK", 1)  # split even this small layer
    monkeypatch.setattr(gemv.threads, "count", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        blocky = linear(blocks_of(torch.randn(64, 128), 8, 0.7))
        offered = gemv.candidates(blocky)
        plain = [name for name in offered if not name.endswith(gemv.SERIAL)]
        assert sorted(offered) == sorted(plain + [name + gemv.SERIAL for name in plain])
        x = torch.randn(1, 128)
        for name in plain:
            parallel, serial = offered[name](), offered[name + gemv.SERIAL]()
            assert not parallel.serial and serial.serial
            assert len(parallel._split()) > 2 and serial._split() == [0, serial._units()[0]]
            with torch.no_grad():
                assert torch.equal(parallel(x), serial(x)), name
    finally:
        torch.set_num_threads(before)


def test_conv1d_is_compiled_like_a_linear():
    layer = transformers.pytorch_utils.Conv1D(48, 32)  # (in 32, out 48), weight stored (in, out)
    with torch.no_grad():
        layer.weight.copy_(blocks_of(torch.randn(48, 32), 8, 0.6).T)
    fast = GemvLinear(layer, "block8")
    x = torch.randn(1, 1, 32)
    with torch.inference_mode():
        ref = layer(x)
        assert (fast(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


def prefer(monkeypatch, order: tuple[str, ...]) -> None:
    """Make compile's timing rank candidates by ``order`` (label prefixes), dense last: the decisions are not
    under test, the kernels in place are."""
    import prunekit.runtime.compiler as compiler

    def rank(label: str) -> float:
        return next((1.0 + i for i, p in enumerate(order) if label.startswith(p)), 1e9)

    monkeypatch.setattr(
        compiler, "_time", lambda fns, **kw: ({n: rank(n) for n in fns}, {n: 0.0 for n in fns})
    )


@pytest.mark.parametrize("make", [llama, qwen2, gpt2], ids=["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize(
    "how, order",
    [("2:4", ("gemv:nm",)), ("block", ("gemv:block8", "gemv:block")), ("unstructured", ("gemv:csr4",))],
)
def test_compiled_causal_lm_generates_the_same_tokens(monkeypatch, make, how, order):
    torch.manual_seed(5)
    model = prune_blocks(make(), how)
    ids = torch.randint(0, 128, (1, 7))
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=10, do_sample=False)
    prefer(monkeypatch, (*order, "gemv:dense"))
    compiled = rt.compile(model, {"input_ids": ids[:, :1]}, **FAST)
    with torch.inference_mode():
        got = compiled.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want)
    table = rt.report(compiled)
    assert all(isinstance(compiled.get_submodule(d.name), GemvLinear) for d in table.layers)
    decoder = [d for d in table.layers if d.name != "lm_head"]
    assert all(d.chosen.startswith(order[-1]) for d in decoder), [d.chosen for d in decoder]
    assert all(d.input_shape[-2:] == (1, d.weight_shape[1]) for d in table.layers)
    assert not any(isinstance(m, GemvLinear) for m in model.modules())  # the original is untouched


def test_compile_as_timed_keeps_the_tokens():
    model = prune_blocks(llama(), "block")
    ids = torch.randint(0, 128, (1, 7))
    compiled = rt.compile(model, {"input_ids": ids[:, :1]}, **FAST)
    with torch.inference_mode():
        assert torch.equal(
            compiled.generate(ids, max_new_tokens=10, do_sample=False),
            model.generate(ids, max_new_tokens=10, do_sample=False),
        )


def test_int8_values_generate_what_the_int8_rounded_weights_do():
    """``values="int8"`` is weight-only int8: the compiled model decodes like the uncompiled model whose
    linear weights are the int8-rounded ones (the lm_head included), not like the float32 model."""
    torch.manual_seed(6)
    model = prune_blocks(llama(), "block")
    ids = torch.randint(0, 128, (1, 6))
    compiled = rt.compile(model, {"input_ids": ids[:, :1]}, values="int8", **FAST)
    rounded = prune_blocks(llama(), "block")
    rounded.load_state_dict(model.state_dict())
    rounded.lm_head.weight = nn.Parameter(rounded.lm_head.weight.detach().clone())  # untie, then round
    for name, module in rounded.named_modules():
        if isinstance(module, nn.Linear):
            module.weight.data.copy_(compiled.get_submodule(name).weight)
    with torch.inference_mode():
        want = rounded.generate(ids, max_new_tokens=8, do_sample=False)
        got = compiled.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    rows = rt.report(compiled).layers
    assert all(d.chosen.startswith("gemv:") for d in rows)  # int8 everywhere, asked for
    assert compiled.lm_head.values == "int8"


def test_head_values_apply_to_the_lm_head_alone():
    model = prune_blocks(llama(), "2:4")
    ids = torch.randint(0, 128, (1, 1))
    compiled = rt.compile(model, {"input_ids": ids}, head_values="int8", **FAST)
    assert isinstance(compiled.lm_head, GemvLinear) and compiled.lm_head.values == "int8"
    others = [m for n, m in compiled.named_modules() if isinstance(m, GemvLinear) and n != "lm_head"]
    assert all(m.values == "float32" for m in others)


def test_cold_timing_flushes_before_every_call(monkeypatch):
    calls = []
    monkeypatch.setattr("prunekit.runtime.coldcache.Flush.__call__", lambda self: calls.append(1))
    model = nn.Sequential(linear(blocks_of(torch.randn(32, 64), 8, 0.8)))
    compiled = rt.compile(model, torch.randn(1, 64), cold=True, **FAST)
    assert rt.report(compiled).cold and "cold caches" in str(rt.report(compiled))
    assert len(calls) >= 2 * (len(rt.report(compiled).layers[0].candidates) + 1)


def test_last_level_cache_is_read():
    from prunekit.runtime.coldcache import last_level_cache_bytes

    assert last_level_cache_bytes() >= 1 << 20


# -- 2:4 on CUDA sparse tensor cores ---------------------------------------------------------------------
def test_semi_structured_decisions_need_2_4_a_kernel_dtype_a_tile_shape_and_ampere():
    w = two_four(torch.randn(64, 128)).half()
    assert cuda.semi_structured_reason(w, capability=(8, 0)) is None
    assert "not 2:4" in cuda.semi_structured_reason(torch.randn(64, 128).half())
    assert "not a multiple" in cuda.semi_structured_reason(two_four(torch.randn(64, 96)).half())
    assert "no semi-structured kernel" in cuda.semi_structured_reason(w.double())
    assert "no sparse tensor cores" in cuda.semi_structured_reason(w, capability=(7, 5))
    assert cuda.semi_structured_reason(two_four(torch.randn(32, 32))) is None  # float32: 32 x 32 tiles


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_compile_for_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(PrunekitError, match="no CUDA GPU"):
        rt.compile(nn.Sequential(nn.Linear(64, 64)), torch.randn(1, 64), device="cuda")
    with pytest.raises(PrunekitError, match="'cpu' or a CUDA device"):
        rt.compile(nn.Sequential(nn.Linear(64, 64)), torch.randn(1, 64), device="mps")


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (sparse tensor cores, compute 8.0+)"
)
def test_compile_on_cuda_runs_2_4_layers_semi_structured_when_faster():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("GPU older than Ampere: no sparse tensor cores")
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024)).half()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.copy_(two_four(layer.weight.float()).half())
    x = torch.randn(64, 1024, dtype=torch.float16, device="cuda")
    compiled = rt.compile(model, x, device="cuda", budget_s=0.05)
    with torch.inference_mode():
        ref = model.cuda()(x)
        y = compiled(x)
    assert (y - ref).abs().max() <= 2e-2 * ref.abs().max()
    rows = rt.report(compiled).layers
    assert all("2:4-sparse" in d.candidates for d in (rows[0], rows[1]))
    for d in rows:
        chosen = compiled.get_submodule(d.name)
        assert isinstance(chosen, cuda.SemiStructuredLinear) == (d.chosen == "2:4-sparse")
        assert d.chosen == "dense" or d.candidates[d.chosen] < d.dense_us


# -- the compressed file's layouts, run as stored ------------------------------------------------------------
@pytest.mark.parametrize(
    "how, spec, encodings, layout",
    [("block", "block:8x1@0.7", {"block"}, "block8"), ("2:4", "2:4", {"nm", "bitmask"}, "nm2:4")],
)
def test_a_compressed_llm_runs_its_stored_layouts(tmp_path, how, spec, encodings, layout):
    """Blocks run from the stored arrays; 2:4 (where int8 bitmask and slots cost the same bytes, and the tie
    goes to the bitmask) from the positions either holds."""
    from prunekit.compress.container import read_header, save_compressed
    from prunekit.spec import parse

    torch.manual_seed(8)
    model = prune_blocks(llama(), how)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    specs = {f"{n}.weight": parse(spec).to_dict() for n in names}
    path = save_compressed(model, tmp_path / "m.safetensors", "int8", specs=specs)
    header = read_header(path)["tensors"]
    assert {header[f"{n}.weight"]["encoding"] for n in names} <= encodings
    served = gemv.from_compressed(llama(), path)
    layers = {n: served.get_submodule(n) for n in names}
    assert all(isinstance(m, GemvLinear) and m.values == "int8" for m in layers.values())
    assert {m.layout for m in layers.values()} == {layout}
    # the same tokens as the model with the int8-rounded weights (what the file holds), uncompiled
    rounded = llama()
    rounded.load_state_dict(served.state_dict(), strict=False)
    for n, m in served.named_modules():
        if isinstance(m, GemvLinear):  # the decoder's and the lm_head's int8-rounded weights
            rounded.get_submodule(n).weight.data.copy_(m.weight)
    ids = torch.randint(0, 128, (1, 6))
    with torch.inference_mode():
        assert torch.equal(
            served.generate(ids, max_new_tokens=8, do_sample=False),
            rounded.generate(ids, max_new_tokens=8, do_sample=False),
        )
