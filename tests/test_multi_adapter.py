"""Several named adapters on one base model: loading, the active adapter, shared ``A``,
mixed batches (``per_sample_adapters``) against rows run alone and against PEFT's mixed
batches, generate, merging, deleting, and the refusals."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _models import LLAMA_TARGETS, tiny_llama  # noqa: E402
from torch import nn  # noqa: E402

import asymlora  # noqa: E402
from asymlora import AdapterMismatchError, LoraConfig  # noqa: E402
from asymlora.nn import lora_layers  # noqa: E402

ATTN = ["q_proj", "v_proj"]


def randomize(model, name: str, seed: int, scale: float = 0.1) -> None:
    """Random B (and stored A stays) for adapter ``name`` in every layer holding it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if layer.has_adapter(name):
                b = layer.adapter(name).lora_B
                b.copy_((torch.randn(b.shape, generator=gen) * scale).to(b.dtype))


def ids(batch=4, seq=9, seed=3):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def adapter_file(tmp_path, name: str, config: LoraConfig, seed: int, dtype=torch.float32):
    """An adapter file trained (randomised) on the tiny Llama base, and its path."""
    model = tiny_llama(dtype=dtype)
    asymlora.wrap(model, config)
    randomize(model, "default", seed)
    path = tmp_path / f"{name}.safetensors"
    asymlora.save_adapter(model, path)
    return path


#: the adapters of the mixed-batch tests: two share every A (seed 5), one has another
#: seed and fewer modules, one a smaller rank, one stores a trained A
CONFIGS = {
    "fr": LoraConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS, seed=5),
    "de": LoraConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS, seed=5),
    "it": LoraConfig(r=4, alpha=16, target_modules=ATTN, seed=6),
    "es": LoraConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"], seed=5),
    "pt": LoraConfig(r=4, alpha=8, target_modules=ATTN, train="AB", seed=7),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    paths = {}
    for i, (name, config) in enumerate(CONFIGS.items()):
        paths[name] = adapter_file(tmp, name, config, seed=10 + i)
    # the AB adapter: a trained (non-generator) A as well
    model = asymlora.load_adapter(tiny_llama(), paths["pt"], is_trainable=True)
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.add_(torch.randn(layer.lora_A.shape, generator=gen) * 0.05)
    asymlora.save_adapter(model, paths["pt"])
    return paths


def multi_model(files, names=tuple(CONFIGS), dtype=torch.float32):
    model = tiny_llama(dtype=dtype).eval()
    for name in names:
        asymlora.load_adapter(model, files[name], adapter_name=name)
    return model


def alone(files, name, dtype=torch.float32):
    """The tiny Llama with adapter ``name`` only (``None``: the base model)."""
    model = tiny_llama(dtype=dtype).eval()
    if name is not None:
        asymlora.load_adapter(model, files[name])
    return model


def storage_bytes(model) -> int:
    """Bytes of every distinct storage among the model's parameters and buffers."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# --- loading, the active adapter ---------------------------------------------------------


def test_load_named_adapters_and_switch_between_them(files):
    model = multi_model(files, ["fr", "it"])
    assert asymlora.list_adapters(model) == ["fr", "it"]
    assert asymlora.active_adapter(model) == "fr"  # the first; loading more does not switch
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, alone(files, "fr")(x).logits)
        asymlora.set_adapter(model, "it")
        assert torch.equal(model(x).logits, alone(files, "it")(x).logits)
        with asymlora.disable_adapters(model):
            assert torch.equal(model(x).logits, alone(files, None)(x).logits)
        assert torch.equal(model(x).logits, alone(files, "it")(x).logits)
    # "it" adapts q and v only: the other layers hold "fr" alone and add nothing now
    mlp = model.model.layers[0].mlp.up_proj
    assert mlp.adapter_names == ["fr"] and mlp.active_adapter is None
    assert asymlora.nn.config_of(model).seed == 6
    assert asymlora.nn.config_of(model, "fr").seed == 5


def test_wrap_adds_a_named_adapter_and_only_the_active_one_trains():
    model = tiny_llama()
    asymlora.wrap(model, LoraConfig(r=4, target_modules=ATTN, seed=1))
    asymlora.wrap(model, LoraConfig(r=2, target_modules=["o_proj", "q_proj"], seed=2), "two")
    assert asymlora.list_adapters(model) == ["default", "two"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_B" for n, layer in lora_layers(model) if "lora_B" in dir(layer)}
    asymlora.set_adapter(model, "two")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_adapters.two.lora_B" in n for n in trainable)
    assert len(trainable) == 4  # q and o of two layers
    # the o_proj layers are new and hold "two" only; streams as on a fresh model
    fresh = asymlora.wrap(
        tiny_llama(), LoraConfig(r=2, target_modules=["o_proj", "q_proj"], seed=2)
    )
    streams = {n: layer.stream for n, layer in lora_layers(fresh)}
    for name, layer in lora_layers(model):
        assert layer.adapter("two").stream == streams[name] if layer.has_adapter("two") else True
    # one training step moves "two" only
    before = {n: t.detach().clone() for n, t in model.state_dict().items() if "lora_B" in n}
    x = ids()
    model(x, labels=x).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    changed = {
        n for n, t in model.state_dict().items() if "lora_B" in n and not torch.equal(t, before[n])
    }
    assert changed == {n.replace(".weight", "") for n in trainable}
    with pytest.raises(ValueError, match=r"already wrapped.*adapter_name"):
        asymlora.wrap(model, LoraConfig(target_modules=ATTN))


def test_save_each_adapter_gives_back_its_file(files, tmp_path):
    model = multi_model(files)
    for name, path in files.items():
        out = tmp_path / f"{name}-again.safetensors"
        asymlora.save_adapter(model, out, adapter_name=name)
        assert out.read_bytes() == path.read_bytes(), name
    asymlora.set_adapter(model, "it")
    asymlora.save_adapter(model, tmp_path / "active.safetensors")  # default: the active one
    assert (tmp_path / "active.safetensors").read_bytes() == files["it"].read_bytes()


def test_state_dict_keys_of_named_adapters(files):
    model = multi_model(files, ["fr", "pt"])
    keys = {k for k in model.state_dict() if "lora" in k}
    q = "model.layers.0.self_attn.q_proj"
    # regenerated A is never in a state dict; a stored A is, under its adapter
    assert f"{q}.lora_adapters.fr.lora_B" in keys and f"{q}.lora_adapters.pt.lora_A" in keys
    assert f"{q}.lora_adapters.fr.lora_A" not in keys
    state = model.state_dict()
    other = multi_model(files, ["fr", "pt"])
    other.load_state_dict(state)


# --- shared A, memory -----------------------------------------------------------------------


def test_adapters_from_one_seed_share_every_a_buffer(files, tmp_path):
    model = multi_model(files, ["fr", "de", "it", "pt"])
    for name, layer in lora_layers(model):
        fr, de = layer.adapter("fr"), layer.adapter("de")
        assert fr.lora_A is de.lora_A and fr.lora_A.data_ptr() == de.lora_A.data_ptr(), name
        assert fr.a_shared and fr.a_owner == "fr"
        if layer.has_adapter("it"):  # another seed: its own A
            assert layer.adapter("it").lora_A.data_ptr() != fr.lora_A.data_ptr()
            pt = layer.adapter("pt")  # a stored (trained) A: its own, persistent
            assert not pt.a_shared and pt.lora_A.data_ptr() != fr.lora_A.data_ptr()
    # the shared A is one buffer: counted once, and on DDP's ignore list once
    names = asymlora.nn.distributed.ddp.frozen_factor_names(model)
    assert len(names) == len(set(names))
    q = "model.layers.0.self_attn.q_proj"
    assert f"{q}.lora_A" not in names and f"{q}.lora_adapters.fr.lora_A" in names
    assert f"{q}.lora_adapters.de.lora_A" not in names
    # registered once, so converted once: still one buffer after .to()
    model.to(torch.bfloat16)
    layer = model.model.layers[1].mlp.down_proj
    assert layer.adapter("de").lora_A is layer.adapter("fr").lora_A
    assert layer.adapter("fr").lora_A.dtype == torch.bfloat16


def test_each_added_adapter_of_one_seed_costs_its_b_bytes_only(tmp_path):
    config = LoraConfig(r=8, alpha=16, target_modules=LLAMA_TARGETS, seed=3)
    paths = [adapter_file(tmp_path, f"a{i}", config, seed=i) for i in range(10)]
    model = tiny_llama().eval()
    base = storage_bytes(model)
    asymlora.load_adapter(model, paths[0], adapter_name="a0")
    layers = lora_layers(model)
    a_bytes = sum(layer.adapter("a0").lora_A.numel() * 4 for _, layer in layers)
    b_bytes = sum(layer.adapter("a0").lora_B.numel() * 4 for _, layer in layers)
    assert storage_bytes(model) - base == a_bytes + b_bytes
    for i, path in enumerate(paths[1:], start=1):
        before = storage_bytes(model)
        asymlora.load_adapter(model, path, adapter_name=f"a{i}")
        assert storage_bytes(model) - before == b_bytes, i
    assert asymlora.trainable_parameters(model).frozen_factors == a_bytes // 4 + 10 * b_bytes // 4


def test_deleting_the_owner_of_a_shared_a_keeps_it_for_the_others(files):
    model = tiny_llama().eval()
    asymlora.load_adapter(model, files["fr"])  # "default", the owner of the shared A
    asymlora.load_adapter(model, files["de"], adapter_name="de")
    q = model.model.layers[0].self_attn.q_proj
    a = q.lora_A
    assert q.adapter("de").lora_A is a and q.adapter("de").a_owner == "default"
    asymlora.delete_adapter(model, "default")
    assert asymlora.list_adapters(model) == ["de"] and asymlora.active_adapter(model) == "de"
    assert q.adapter("de").lora_A is a and "lora_A" not in q._buffers
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, alone(files, "de")(x).logits)
    # loading "default" again moves the shared A back onto the layer itself
    asymlora.load_adapter(model, files["fr"], adapter_name="default")
    assert q.lora_A is a and q.adapter("de").a_owner == "default"
    asymlora.delete_adapter(model, "de")
    asymlora.delete_adapter(model, "default")  # the last one: the plain model again
    assert not asymlora.nn.is_wrapped(model)
    assert not any(isinstance(m, asymlora.LoraLayer) for m in model.modules())


def test_delete_adapter_puts_plain_modules_back_where_none_is_left(files):
    model = multi_model(files, ["fr", "it"])
    asymlora.delete_adapter(model, "fr")
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
    assert {n.rpartition(".")[2] for n, _ in lora_layers(model)} == set(ATTN)
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, alone(files, "it")(x).logits)


# --- mixed batches ---------------------------------------------------------------------------

NAMES = ["fr", "it", None, "de", "es", "pt", "fr", None]


def per_row_alone(files, names, x, dtype=torch.float32):
    models = {n: alone(files, n, dtype) for n in set(names)}
    with torch.no_grad():
        return torch.cat([models[n](x[i : i + 1]).logits for i, n in enumerate(names)])


@pytest.mark.parametrize("algorithm", ["gather", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_equals_each_row_alone(files, algorithm, dtype):
    model = multi_model(files, dtype=dtype)
    x = ids(batch=len(NAMES))
    expected = per_row_alone(files, NAMES, x, dtype)
    with torch.no_grad(), asymlora.per_sample_adapters(model, NAMES, algorithm=algorithm):
        mixed = model(x).logits
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(mixed.float(), expected.float(), rtol=tol, atol=tol)
    # the adapters matter: the rows differ from the base model's
    base = alone(files, None, dtype)
    with torch.no_grad():
        assert (mixed[0] - base(x[:1]).logits[0]).abs().max() > 10 * tol
        # None: nothing added (against the base over the same batch: a GEMM row can
        # round differently with the batch size)
        assert torch.equal(mixed[2], base(x).logits[2])
    # and the model is as before the block
    assert all(layer.route is None for _, layer in lora_layers(model))
    assert asymlora.active_adapter(model) == "fr"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_per_adapter_in_order_equals_each_row_alone(files, dtype):
    # Row i on adapter i: the gather reads the B's straight from the stack (no copy).
    names = ["fr", "de"]  # one seed: one A per layer, so one group over the whole batch
    model = multi_model(files, names, dtype=dtype)
    x = ids(batch=len(names))
    expected = per_row_alone(files, names, x, dtype)
    with torch.no_grad(), asymlora.per_sample_adapters(model, names):
        mixed = model(x).logits
        plans = next(layer for _, layer in lora_layers(model)).route._plans.values()
        assert plans and all(g.bt_rows is not None for p in plans for g in p.groups)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(mixed.float(), expected.float(), rtol=tol, atol=tol)
    assert (mixed[1:] - mixed[:1]).abs().max() > 10 * tol  # the rows' adapters differ


def test_a_batch_of_one_adapter_is_bit_exact(files):
    model = multi_model(files, ["fr", "de"])
    x = ids()
    with torch.no_grad():
        with asymlora.per_sample_adapters(model, ["de"] * 4):
            mixed = model(x).logits
        assert torch.equal(mixed, alone(files, "de")(x).logits)


def test_shared_a_is_multiplied_once_per_layer(files, monkeypatch):
    model = multi_model(files, ["fr", "de"])
    q = model.model.layers[0].self_attn.q_proj
    calls = []
    real = torch.nn.functional.linear

    def counting(x, w, *args):
        if w.shape == (4, 64) and w.data_ptr() == q.adapter("fr").lora_A.data_ptr():
            calls.append(tuple(x.shape))
        return real(x, w, *args)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    with torch.no_grad(), asymlora.per_sample_adapters(model, ["fr", "de", None, "de"]):
        model(ids())
    assert calls == [(4, 9, 64)]  # once, for the whole batch, x not copied


def test_mixed_batch_matches_peft(files, tmp_path):
    peft = pytest.importorskip("peft")
    names = ["fr", "it", None, "es", "pt", "de"]
    model = multi_model(files)
    x = ids(batch=len(names))
    with torch.no_grad(), asymlora.per_sample_adapters(model, names):
        ours = model(x).logits
    dirs = {n: asymlora.export_peft(p, tmp_path / n) for n, p in files.items()}
    peft_model = peft.PeftModel.from_pretrained(
        tiny_llama().eval(), str(dirs["fr"]), adapter_name="fr"
    )
    for name in ["it", "de", "es", "pt"]:
        peft_model.load_adapter(str(dirs[name]), adapter_name=name)
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(
            input_ids=x, adapter_names=[n if n is not None else "__base__" for n in names]
        ).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert json.loads((dirs["it"] / "adapter_config.json").read_text())["r"] == 4


def generate(model, x, **kw):
    return model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        **kw,
    )


def test_generate_keeps_each_row_on_its_adapter(files):
    names = ["fr", None, "it", "pt"]
    model = multi_model(files)
    x = ids(batch=len(names), seq=5)
    with asymlora.per_sample_adapters(model, names):
        tokens = generate(model, x)
    for i, name in enumerate(names):
        expected = generate(alone(files, name), x[i : i + 1])
        assert torch.equal(tokens[i : i + 1], expected), (i, name)
    # the rows really differ by adapter
    assert not torch.equal(tokens[0, 5:], generate(alone(files, None), x[:1])[0, 5:])


def test_generate_with_beams_takes_each_name_repeated(files):
    names = ["fr", "it"]
    model = multi_model(files)
    x = ids(batch=2, seq=5)
    with asymlora.per_sample_adapters(model, names), pytest.raises(ValueError, match="repeat"):
        generate(model, x, num_beams=2)
    with asymlora.per_sample_adapters(model, [n for n in names for _ in range(2)]):
        tokens = generate(model, x, num_beams=2)
    for i, name in enumerate(names):
        assert torch.equal(
            tokens[i : i + 1], generate(alone(files, name), x[i : i + 1], num_beams=2)
        )


# --- merging ---------------------------------------------------------------------------------


def test_merge_adapter_merges_the_active_adapter_only(files):
    model = multi_model(files, ["fr", "it"])
    asymlora.set_adapter(model, "it")
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
        asymlora.merge_adapter(model)
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
    assert {layer.merged_adapter for _, layer in lora_layers(model)} == {"it", None}
    with pytest.raises(ValueError, match=r"'it' is merged.*unmerge_adapter"):
        asymlora.set_adapter(model, "fr")
    with pytest.raises(ValueError, match=r"'it' is merged.*unmerge_adapter"):
        asymlora.per_sample_adapters(model, ["fr"] * 4).__enter__()
    with pytest.raises(ValueError, match="'it' is merged"):
        asymlora.disable_adapters(model).__enter__()
    with pytest.raises(ValueError, match="'it' is merged"):
        asymlora.delete_adapter(model, "it")
    asymlora.set_adapter(model, "it")  # the merged one: fine
    asymlora.delete_adapter(model, "fr")  # another one: fine
    asymlora.unmerge_adapter(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_unwrap_merges_the_active_adapter_and_drops_the_others(files):
    model = multi_model(files, ["fr", "it"])
    asymlora.set_adapter(model, "it")
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
        asymlora.unwrap(model)
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
    assert not asymlora.nn.is_wrapped(model)


# --- refusals --------------------------------------------------------------------------------


def test_unknown_and_duplicate_names_are_refused(files, tmp_path):
    model = multi_model(files, ["fr", "it"])
    for call in (
        lambda: asymlora.set_adapter(model, "xx"),
        lambda: asymlora.delete_adapter(model, "xx"),
        lambda: asymlora.save_adapter(model, tmp_path / "x.safetensors", adapter_name="xx"),
    ):
        with pytest.raises(
            ValueError, match=r"no adapter named 'xx'; its adapters: \['fr', 'it'\]"
        ):
            call()
    with pytest.raises(ValueError, match=r"names\[1\] = 'xx' is not an adapter"):
        asymlora.per_sample_adapters(model, ["fr", "xx"]).__enter__()
    with pytest.raises(ValueError, match="already has an adapter named 'it'"):
        asymlora.load_adapter(model, files["de"], adapter_name="it")
    with pytest.raises(ValueError, match="already has an adapter named 'fr'"):
        asymlora.wrap(model, CONFIGS["fr"], adapter_name="fr")
    for bad in ["", "a.b", "keys"]:
        with pytest.raises(ValueError, match="cannot name a module"):
            asymlora.load_adapter(model, files["de"], adapter_name=bad)
    with pytest.raises(TypeError, match="one adapter name"):
        asymlora.per_sample_adapters(model, "fr").__enter__()
    with pytest.raises(ValueError, match="names is empty"):
        asymlora.per_sample_adapters(model, []).__enter__()
    assert asymlora.list_adapters(model) == ["fr", "it"]
    assert all(layer.route is None for _, layer in lora_layers(model))


def test_an_adapter_that_does_not_fit_changes_nothing(files, tmp_path):
    model = multi_model(files, ["fr"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    small = tiny_llama(hidden=32)
    asymlora.wrap(small, LoraConfig(r=4, target_modules=ATTN))
    asymlora.save_adapter(small, tmp_path / "small.safetensors")
    with pytest.raises(AdapterMismatchError, match="q_proj: model is 64x64"):
        asymlora.load_adapter(model, tmp_path / "small.safetensors", adapter_name="small")
    assert asymlora.list_adapters(model) == ["fr"]
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_modules_to_save_hold_one_adapter_only(files, tmp_path):
    model = tiny_llama()
    asymlora.wrap(model, LoraConfig(r=2, target_modules=ATTN, modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match=r"modules_to_save.*one adapter only"):
        asymlora.load_adapter(model, files["fr"], adapter_name="fr")
    asymlora.save_adapter(model, tmp_path / "saves.safetensors")
    other = multi_model(files, ["fr"])
    with pytest.raises(ValueError, match=r"modules_to_save.*one adapter only"):
        asymlora.load_adapter(other, tmp_path / "saves.safetensors", adapter_name="saves")
    assert asymlora.list_adapters(other) == ["fr"]


def test_wrong_batch_size_and_grad_are_refused_at_forward(files):
    model = multi_model(files, ["fr", "it"])
    with asymlora.per_sample_adapters(model, ["fr", "it", None]):
        with torch.no_grad(), pytest.raises(ValueError, match=r"names has 3 entries.*4 rows"):
            model(ids(batch=4))
        # loaded without is_trainable: no factor requires grad, so grad mode is fine
        model(ids(batch=3))
    trained = tiny_llama()
    asymlora.wrap(trained, LoraConfig(r=2, target_modules=ATTN))
    with asymlora.per_sample_adapters(trained, ["default", None]):
        with pytest.raises(RuntimeError, match=r"for inference.*'default'.*torch.no_grad"):
            trained(ids(batch=2))
        with torch.no_grad():
            trained(ids(batch=2))


def test_no_state_change_inside_a_block(files, tmp_path):
    model = multi_model(files, ["fr", "it"])
    with asymlora.per_sample_adapters(model, ["fr"]):
        for call in (
            lambda: asymlora.set_adapter(model, "it"),
            lambda: asymlora.delete_adapter(model, "it"),
            lambda: asymlora.merge_adapter(model),
        ):
            with pytest.raises(ValueError, match="leave"):
                call()
    with asymlora.disable_adapters(model), asymlora.per_sample_adapters(model, ["it"]):
        pass  # nested blocks restore the routes in order
    assert all(layer.route is None for _, layer in lora_layers(model))


def test_one_adapter_models_are_unchanged(tmp_path):
    model = tiny_llama()
    asymlora.wrap(model, LoraConfig(r=4, target_modules=ATTN))
    layer = model.model.layers[0].self_attn.q_proj
    assert asymlora.list_adapters(model) == ["default"]
    assert "lora_adapters" not in dict(layer.named_children())
    assert {k.rpartition(".")[2] for k in model.state_dict() if "lora" in k} == {"lora_B"}
    assert layer.extra_repr() == "rank=4, scale=4, stream=0, train=B, merged=False"


# --- CUDA ------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_mixed_batch_matches_cpu_rows(files, dtype):
    model = multi_model(files).to("cuda", dtype)
    x = ids(batch=len(NAMES))
    expected = per_row_alone(files, NAMES, x)
    with torch.no_grad(), asymlora.per_sample_adapters(model, NAMES):
        mixed = model(x.cuda()).logits.float().cpu()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(mixed, expected, rtol=tol, atol=tol)
    q = model.model.layers[0].self_attn.q_proj
    assert q.adapter("fr").lora_A is q.adapter("de").lora_A  # still one buffer after .to()
