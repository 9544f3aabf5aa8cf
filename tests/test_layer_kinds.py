"""Embeddings and convolutions in the torch layer: forward against float64 references,
training of each factor, in-memory merge, mixed batches, refusals, and PEFT's numbers."""

from __future__ import annotations

import math
import warnings

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import asymlora  # noqa: E402
from asymlora import LoraConfig  # noqa: E402
from asymlora.nn import lora_layers  # noqa: E402

CONVS = {
    "conv1d": (nn.Conv1d, dict(kernel_size=3, padding=1), (2, 6, 11)),
    "conv2d": (nn.Conv2d, dict(kernel_size=(3, 2), stride=(2, 1), padding=1), (2, 6, 9, 7)),
    "conv2d-dilated": (nn.Conv2d, dict(kernel_size=3, dilation=2, padding=2), (2, 6, 9, 9)),
    "conv2d-reflect": (
        nn.Conv2d,
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
        (2, 6, 8, 8),
    ),
    "conv3d": (nn.Conv3d, dict(kernel_size=(1, 3, 3), padding=(0, 1, 1)), (2, 6, 3, 5, 5)),
}


class Net(nn.Module):
    def __init__(self, conv: nn.Module | None = None, vocab: int = 50, dim: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.conv = conv if conv is not None else nn.Conv1d(dim, 10, 3, padding=1)
        self.head = nn.Linear(10, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.embed(ids).transpose(1, 2)).mean(-1))


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)


def reference(layer: nn.Module, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base layer with W + s*B@A in float64 (an independent dense computation)."""
    a, b = layer.lora_A.double(), layer.lora_B.double()
    delta = layer.scale * (b @ a)
    ref = type(base)(**_ctor(base)).double()
    ref.load_state_dict({k: v.double() for k, v in base.state_dict().items()})
    with torch.no_grad():
        if isinstance(base, nn.Embedding):
            ref.weight += delta.t()
        else:
            ref.weight += delta.reshape(ref.weight.shape)
    return ref(x if not x.is_floating_point() or x.dtype == torch.float64 else x.double())


def _ctor(base: nn.Module) -> dict:
    if isinstance(base, nn.Embedding):
        return dict(
            num_embeddings=base.num_embeddings,
            embedding_dim=base.embedding_dim,
            padding_idx=base.padding_idx,
        )
    return dict(
        in_channels=base.in_channels,
        out_channels=base.out_channels,
        kernel_size=base.kernel_size,
        stride=base.stride,
        padding=base.padding,
        dilation=base.dilation,
        padding_mode=base.padding_mode,
        bias=base.bias is not None,
    )


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_forward_equals_float64_reference(name):
    cls, kw, shape = CONVS[name]
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("conv", cls(shape[1], 8, **kw))
    base = model.conv
    asymlora.wrap(model, LoraConfig(r=4, alpha=8, target_modules=["conv"]))
    randomize_b(model)
    layer = model.conv
    assert layer.kind == "conv" and layer.d_in == shape[1] * math.prod(layer.kernel)
    x = torch.randn(shape)
    got = model(x)
    want = reference(layer, base, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    # unbatched input too
    torch.testing.assert_close(model(x[0]).double(), want[0], atol=2e-5, rtol=1e-5)


def test_embedding_forward_equals_float64_reference():
    torch.manual_seed(0)
    model = Net()
    base = model.embed
    asymlora.wrap(model, LoraConfig(r=4, alpha=8, target_modules=["embed"]))
    randomize_b(model)
    layer = model.embed
    assert (layer.kind, layer.d_in, layer.d_out) == ("embedding", 50, 12)
    assert tuple(layer.lora_A.shape) == (4, 50) and tuple(layer.lora_B.shape) == (12, 4)
    ids = torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(
        layer(ids).double(), reference(layer, base, ids), atol=1e-6, rtol=1e-6
    )


def test_embed_scale_scales_the_branch_like_the_base():
    class Scaled(nn.Embedding):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.register_buffer("embed_scale", torch.tensor(3.0), persistent=False)

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("embed", Scaled(30, 8))
    asymlora.wrap(model, LoraConfig(r=2, alpha=2, target_modules=["embed"]))
    randomize_b(model)
    ids = torch.randint(0, 30, (2, 5))
    out = model(ids)
    asymlora.merge_adapter(model)
    torch.testing.assert_close(model(ids), out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("train", ["B", "A", "AB"])
def test_training_reaches_only_the_trained_factors(train):
    torch.manual_seed(0)
    model = Net(nn.Conv1d(12, 10, 3, padding=1))
    asymlora.wrap(model, LoraConfig(r=3, alpha=6, target_modules=["embed", "conv"], train=train))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    want = set()
    for name in ("embed", "conv"):
        want |= {f"{name}.lora_{f}" for f in train}
    assert trainable == want
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(1, 50, (4, 9))
    target = torch.randn(4, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(ids), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in want), n


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward of ``model(x).sum()``."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(seen.values())


def conv_model(train: str, dropout: float = 0.0, **kw) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(32, 24, 3, **kw))
    config = LoraConfig(r=2, alpha=2, target_modules=["conv"], train=train, dropout=dropout)
    return asymlora.wrap(model, config)


def test_b_only_conv_keeps_no_copy_of_its_input_for_backward():
    # With A frozen the branch needs only x A^T for backward; a trained A needs the
    # (dropped-out) input too, as torch's convolution keeps it.
    x = torch.randn(4, 32, 16, 16, requires_grad=True)
    b_only = saved_bytes(conv_model("B", 0.1, padding=1), x)
    both = saved_bytes(conv_model("AB", 0.1, padding=1), x)
    assert both - b_only >= x.numel() * x.element_size()


@pytest.mark.parametrize(
    "kw",
    [
        dict(padding=1, stride=2),
        dict(padding=2, dilation=2),
        dict(padding=1, padding_mode="circular"),
    ],
)
def test_frozen_a_conv_gradients_equal_float64(kw):
    model = conv_model("B", **kw)
    randomize_b(model)
    layer, base = model.conv, model.conv.base_layer
    x = torch.randn(2, 32, 9, 9, requires_grad=True)
    model(x).square().sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    reference(layer, base, x64).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-5)
    # the unbatched path too
    x1 = x.detach()[0].requires_grad_(True)
    model(x1).square().sum().backward()
    r1 = x.detach()[:1].double().requires_grad_(True)
    reference(layer, base, r1).square().sum().backward()
    torch.testing.assert_close(x1.grad.double(), r1.grad[0], atol=1e-4, rtol=1e-5)


def test_merge_unmerge_in_memory():
    torch.manual_seed(0)
    model = Net(nn.Conv1d(12, 10, 3, padding=1))
    asymlora.wrap(model, LoraConfig(r=3, alpha=6, target_modules=["embed", "conv"]))
    randomize_b(model)
    ids = torch.randint(0, 50, (2, 6))
    out = model(ids)
    w = model.conv.base_layer.weight.detach().clone()
    asymlora.merge_adapter(model)
    torch.testing.assert_close(model(ids), out, atol=1e-5, rtol=1e-5)
    asymlora.unmerge_adapter(model)
    torch.testing.assert_close(model.conv.base_layer.weight, w, atol=1e-6, rtol=0)
    plain = asymlora.unwrap(model)
    assert isinstance(plain.embed, nn.Embedding) and isinstance(plain.conv, nn.Conv1d)
    torch.testing.assert_close(plain(ids), out, atol=1e-5, rtol=1e-5)


def test_mixed_batch_rows_equal_single_adapter_runs():
    torch.manual_seed(0)
    model = Net(nn.Conv1d(12, 10, 3, padding=1))
    config = LoraConfig(r=3, alpha=6, target_modules=["embed", "conv"], seed=5)
    asymlora.wrap(model, config, adapter_name="one")
    asymlora.wrap(model, config, adapter_name="two")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in ("one", "two"):
                b = layer.adapter(name).lora_B
                b.copy_(torch.randn(b.shape, generator=gen))
    ids = torch.randint(0, 50, (3, 6))
    singles = {}
    with torch.no_grad():
        for name in ("one", "two"):
            asymlora.set_adapter(model, name)
            singles[name] = model(ids)
        with asymlora.disable_adapters(model):
            singles[None] = model(ids)
        for algorithm in ("gather", "grouped"):
            with asymlora.per_sample_adapters(model, ["two", None, "one"], algorithm=algorithm):
                mixed = model(ids)
            for row, name in enumerate(["two", None, "one"]):
                torch.testing.assert_close(mixed[row], singles[name][row], atol=1e-5, rtol=1e-5)


def test_grouped_conv_and_max_norm_embedding_are_refused_by_name():
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(4, 4, 3, groups=2))
    model.add_module("emb", nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(ValueError, match="conv: Conv2d with groups=2") as err:
        asymlora.wrap(model, LoraConfig(r=2, target_modules=["conv", "emb"]))
    assert "emb: Embedding with max_norm=1.0" in str(err.value)
    assert isinstance(model.conv, nn.Conv2d) and isinstance(model.emb, nn.Embedding)


def test_all_linear_leaves_embeddings_and_convs_alone():
    model = Net()
    asymlora.wrap(model, LoraConfig(r=2, target_modules="all-linear"))
    assert [n for n, _ in lora_layers(model)] == ["head"]


def test_tied_embedding_trains_but_refuses_the_in_memory_merge():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.lm_head = nn.Linear(8, 20, bias=False)
            self.lm_head.weight = self.embed.weight

        def forward(self, ids):
            return self.lm_head(self.embed(ids))

    model = Tied()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asymlora.wrap(model, LoraConfig(r=2, target_modules=["embed"]))
    assert model.embed.tied_with == "lm_head"
    randomize_b(model)
    w = model.lm_head.weight.detach().clone()
    with pytest.raises(ValueError, match="tied to lm_head"):
        asymlora.merge_adapter(model)
    assert torch.equal(model.lm_head.weight, w) and not model.embed.merged


def test_save_and_load_round_trip_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = Net(nn.Conv1d(12, 10, 3, padding=1))
    asymlora.wrap(model, LoraConfig(r=3, alpha=6, target_modules=["embed", "conv"]))
    randomize_b(model)
    ids = torch.randint(0, 50, (2, 6))
    out = model(ids)
    path = tmp_path / "kinds.safetensors"
    asymlora.save_adapter(model, path)
    cfg = asymlora.read_adapter(path).config
    assert cfg.modules["embed"].kind == "embedding" and cfg.modules["conv"].kind == "conv"
    assert tuple(cfg.modules["conv"].kernel) == (3,) and cfg.modules["conv"].d_in == 36
    fresh = Net(nn.Conv1d(12, 10, 3, padding=1))
    fresh.load_state_dict(asymlora.unwrap(model, merge=False).state_dict())
    asymlora.load_adapter(fresh, path)
    assert torch.equal(fresh(ids), out)


def test_load_refuses_another_kind_by_name(tmp_path):
    torch.manual_seed(0)
    model = Net(nn.Conv1d(12, 10, 3, padding=1))
    asymlora.wrap(model, LoraConfig(r=3, target_modules=["conv"]))
    path = tmp_path / "conv.safetensors"
    asymlora.save_adapter(model, path)
    other = Net(nn.Conv1d(12, 10, 3, padding=1))
    other.conv = nn.Linear(36, 10)  # same W shape, another kind
    with pytest.raises(
        ValueError, match=r"conv: model has a linear, adapter a conv with kernel \(3,\)"
    ):
        asymlora.load_adapter(other, path)
    assert isinstance(other.conv, nn.Linear)


def test_offline_merge_of_a_saved_adapter_equals_the_adapted_model(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = Net(nn.Conv2d(12, 10, (3, 1), padding=(1, 0)))
    model.forward = lambda ids: model.head(  # a 2-D conv over (tokens, 1)
        model.conv(model.embed(ids).transpose(1, 2).unsqueeze(-1)).mean((-1, -2))
    )
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    asymlora.wrap(model, LoraConfig(r=3, alpha=6, target_modules=["embed", "conv"]))
    randomize_b(model)
    ids = torch.randint(0, 50, (2, 6))
    out = model(ids)
    save_file(base_state, tmp_path / "model.safetensors")
    asymlora.save_adapter(model, tmp_path / "a.safetensors")
    asymlora.merge_files(
        tmp_path / "model.safetensors", tmp_path / "a.safetensors", tmp_path / "out"
    )
    out_path = tmp_path / "out"
    merged = load_file(out_path if out_path.is_file() else next(out_path.glob("*.safetensors")))
    plain = asymlora.unwrap(model, merge=False)
    plain.load_state_dict(merged)
    torch.testing.assert_close(plain(ids), out, atol=1e-5, rtol=1e-5)


def test_peft_computes_the_same_loss_and_b_gradients(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)

    class Net2d(Net):
        def forward(self, ids):
            h = self.embed(ids).transpose(1, 2).unsqueeze(-1)
            return self.head(self.conv(h).mean((-1, -2)))

    base = Net2d(nn.Conv2d(12, 10, (3, 1), padding=(1, 0)))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    ours = Net2d(nn.Conv2d(12, 10, (3, 1), padding=(1, 0)))
    ours.load_state_dict(state)
    asymlora.wrap(ours, LoraConfig(r=3, alpha=6, target_modules=["embed", "conv"]))
    randomize_b(ours)
    asymlora.save_adapter(ours, tmp_path / "a.safetensors")
    asymlora.export_peft(tmp_path / "a.safetensors", tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a missing or unexpected key warns
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft", is_trainable=True)
    ids = torch.randint(1, 50, (4, 7))
    target = torch.randn(4, 4)
    losses = []
    for model in (ours, theirs):
        loss = torch.nn.functional.mse_loss(model(ids), target)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-7)
    peft_grads = {n: p.grad for n, p in theirs.named_parameters() if "lora_" in n and "B" in n}
    embed_b = next(g for n, g in peft_grads.items() if "embed" in n)
    conv_b = next(g for n, g in peft_grads.items() if "conv" in n)
    torch.testing.assert_close(ours.embed.lora_B.grad, embed_b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.conv.lora_B.grad, conv_b.reshape(10, 3), atol=1e-6, rtol=1e-5)
