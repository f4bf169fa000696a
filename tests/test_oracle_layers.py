"""Each supported layer kind, inside small models, against the one-sample-at-a-time oracle (float64, rel
1e-6).

Every case runs under three settings: all-layer + automatic (total per-sample norm, cross terms included),
param-wise + automatic (each parameter's own per-sample norm), layer-wise + abadi with C at the median
per-sample norm (some samples clipped, others passed through unscaled)."""

from __future__ import annotations

import models as M
import pytest
import torch
from oracle import (
    check_against_oracle,
    make_mse_inputs,
    per_sample_grads,
    resolve_groups,
    spread_C,
    weighted_mse,
)
from torch import nn

SETTINGS = [("all-layer", "automatic"), ("param-wise", "automatic"), ("layer-wise", "abadi")]
SETTING_IDS = [f"{g}-{c}" for g, c in SETTINGS]


def run_case(model: nn.Module, x: torch.Tensor, setting: tuple[str, str], extra_inputs=()) -> None:
    groups, clipping = setting
    model = model.double()
    if extra_inputs:
        # models taking a second batched input: loss(model, x, mem, target, w)
        mem = extra_inputs[0]
        with torch.no_grad():
            out = model(x.double(), mem.double())
        target = torch.randn(out.shape, dtype=torch.float64)
        w = torch.logspace(-1.5, 1.5, x.shape[0], dtype=torch.float64)

        def loss_fn(m, x_, mem_, t_, w_):
            return (w_ * ((m(x_, mem_) - t_) ** 2).flatten(1).mean(1)).mean()

        inputs = (x, mem, target, w)
    else:
        loss_fn = weighted_mse
        inputs = make_mse_inputs(model, x)
    C = spread_C(model, loss_fn, inputs) if clipping == "abadi" else 1.0
    check_against_oracle(model, loss_fn, inputs, C=C, clipping=clipping, groups=groups)


@pytest.fixture(autouse=True)
def _seed():
    M.seeded(0)


# ----------------------------------------------------------------------------------------------------
# the oracle itself (no engine): per-sample gradients agree with torch.func, and the formula with a hand check
# ----------------------------------------------------------------------------------------------------
def test_oracle_per_sample_grads_match_torch_func():
    from torch.func import functional_call, grad, vmap

    model = M.LinearNet(6, 5, 4).double()
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    inputs = make_mse_inputs(model, x)
    names, grads = per_sample_grads(model, weighted_mse, inputs)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, xi, ti, wi):
        return weighted_mse(lambda z: functional_call(model, p, (z,)), xi[None], ti[None], wi[None])

    ref = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, *inputs)
    for n in names:
        for i in range(x.shape[0]):
            torch.testing.assert_close(grads[i][n], ref[n][i], rtol=1e-12, atol=1e-14)


def test_oracle_formula_by_hand():
    """A 1-parameter model y = w * x with loss (w x - t)^2: g_i = 2 x_i (w x_i - t_i), checked by hand."""
    from oracle import oracle_grads

    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.7]))

        def forward(self, x):
            return self.w * x

    m = Scalar()
    x = torch.tensor([[1.0], [2.0], [-3.0]])
    t = torch.tensor([[0.0], [1.0], [2.0]])

    def loss_fn(model, x_, t_):
        return ((model(x_) - t_) ** 2).sum(1).mean()

    xd, td = x[:, 0].double(), t[:, 0].double()
    g = 2 * xd * (torch.tensor(0.7).double() * xd - td)
    C = 1.3
    exp = {
        "abadi": torch.clamp(C / (g.abs() + 1e-6), max=1.0),
        "automatic": C / (g.abs() + 0.01),
        "autov": C / g.abs(),
        "psac": C / (g.abs() + 0.01 / (g.abs() + 0.01)),
    }
    for clipping, f in exp.items():
        got = oracle_grads(m, loss_fn, (x, t), batch_size=4, C=C, clipping=clipping, groups="all-layer")
        torch.testing.assert_close(got["w"], (f * g).sum().reshape(1) / 4, rtol=1e-12, atol=0)


def test_oracle_layer_wise_groups_order_and_ties():
    m = M.TiedEmbedLinear(decoder_first=False)
    assert resolve_groups(m, "layer-wise") == [
        ["embed.weight"],
        ["decoder.bias"],
        ["mid.0.weight", "mid.0.bias"],
    ]
    m = M.TiedEmbedLinear(decoder_first=True)
    assert resolve_groups(m, "layer-wise") == [
        ["decoder.weight", "decoder.bias"],
        ["mid.0.weight", "mid.0.bias"],
    ]
    m = M.TinyViT()
    assert resolve_groups(m, "layer-wise")[0] == ["cls_token", "pos_embed", "layer_scale"]


# ----------------------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (3, 2)], ids=["2d", "4d"])
def test_linear(setting, bias, lead):
    model = M.LinearNet(6, 5, 4, bias=bias)
    x = torch.randn(5, *lead, 6)
    run_case(model, x, setting)


# ----------------------------------------------------------------------------------------------------
# Convolutions
# ----------------------------------------------------------------------------------------------------
CONV_CASES = [
    # (dim, in, out, kwargs, spatial)
    (1, 3, 4, dict(kernel_size=3), (9,)),
    (1, 4, 6, dict(kernel_size=3, stride=2, padding=1, bias=False), (10,)),
    (1, 4, 4, dict(kernel_size=4, padding="same", dilation=2), (9,)),
    (1, 4, 6, dict(kernel_size=3, groups=2, padding=1, padding_mode="reflect"), (8,)),
    (1, 3, 3, dict(kernel_size=3, groups=3, padding=2, stride=2, padding_mode="circular"), (9,)),
    (2, 3, 4, dict(kernel_size=3), (6, 7)),
    (2, 3, 4, dict(kernel_size=3, stride=2, padding=1), (7, 8)),
    (2, 3, 4, dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), (7, 8)),
    (2, 4, 4, dict(kernel_size=4, padding="same"), (6, 7)),  # even kernel: asymmetric "same" padding
    (2, 4, 6, dict(kernel_size=3, padding="same", dilation=2, padding_mode="reflect"), (7, 7)),
    (2, 4, 6, dict(kernel_size=3, groups=2, padding=1, bias=False), (6, 6)),
    (2, 4, 4, dict(kernel_size=3, groups=4, padding=1, padding_mode="circular"), (6, 5)),  # depthwise
    (2, 4, 8, dict(kernel_size=3, groups=2, stride=2, padding=2, dilation=2, padding_mode="reflect"), (9, 9)),
    (2, 2, 4, dict(kernel_size=3, padding=1, padding_mode="circular", stride=(1, 2)), (5, 6)),
    (3, 2, 3, dict(kernel_size=3, padding=1), (4, 5, 4)),
    (3, 2, 4, dict(kernel_size=(2, 3, 3), stride=(1, 2, 2), groups=2, bias=False), (4, 5, 5)),
    (3, 2, 2, dict(kernel_size=3, padding="same", padding_mode="circular"), (4, 4, 5)),
    (3, 2, 4, dict(kernel_size=2, dilation=2, padding=1, padding_mode="reflect"), (4, 4, 4)),
]


def _conv_id(case):
    dim, cin, cout, kw, _ = case
    return f"conv{dim}d-{cin}to{cout}-" + "-".join(f"{k}={v}" for k, v in kw.items()).replace(" ", "")


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=[_conv_id(c) for c in CONV_CASES])
def test_conv(case, setting):
    dim, cin, cout, kw, spatial = case
    model = M.ConvNet(dim, cin, cout, **kw)
    x = torch.randn(4, cin, *spatial)
    run_case(model, x, setting)


# ----------------------------------------------------------------------------------------------------
# Embedding
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("padding_idx", [0, None])
def test_embedding(setting, padding_idx):
    model = M.EmbedNet(vocab=11, dim=6, padding_idx=padding_idx)
    ids = torch.randint(1, 11, (5, 7))
    ids[:, -2:] = 0  # padding tokens
    ids[1, 0] = 0
    ids[2, :3] = ids[2, 3]  # repeated tokens within one sample
    run_case(model, ids, setting)


# ----------------------------------------------------------------------------------------------------
# Normalization layers
# ----------------------------------------------------------------------------------------------------
NORM_CASES = {
    "layernorm": lambda: (M.LastDimNormNet(nn.LayerNorm(6)), torch.randn(5, 4, 5)),
    "layernorm-no-bias": lambda: (M.LastDimNormNet(nn.LayerNorm(6, bias=False)), torch.randn(5, 4, 5)),
    "rmsnorm": lambda: (M.LastDimNormNet(nn.RMSNorm(6)), torch.randn(5, 4, 5)),
    "rmsnorm-2d-input": lambda: (M.LastDimNormNet(nn.RMSNorm(6)), torch.randn(5, 5)),
    "groupnorm-2d": lambda: (M.ChannelNormNet(2, nn.GroupNorm(3, 6)), torch.randn(5, 3, 4, 3)),
    "groupnorm-1d": lambda: (M.ChannelNormNet(1, nn.GroupNorm(2, 6)), torch.randn(5, 3, 7)),
    "instancenorm1d": lambda: (M.ChannelNormNet(1, nn.InstanceNorm1d(6, affine=True)), torch.randn(5, 3, 7)),
    "instancenorm2d": lambda: (
        M.ChannelNormNet(2, nn.InstanceNorm2d(6, affine=True)),
        torch.randn(5, 3, 4, 3),
    ),
}


def _perturb_affine(model: nn.Module) -> None:
    """Norm layers start at weight 1 / bias 0; move them so that the test does not sit at a special point."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)):
                for p in m.parameters(recurse=False):
                    p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("name", list(NORM_CASES))
def test_norms(name, setting):
    model, x = NORM_CASES[name]()
    _perturb_affine(model)
    run_case(model, x, setting)


# ----------------------------------------------------------------------------------------------------
# transformers' Conv1D, RNNs, attention
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_hf_conv1d(setting):
    run_case(M.HFConv1DNet(), torch.randn(5, 4, 6), setting)


RNN_CASES = [("lstm", 1, False), ("lstm", 2, True), ("gru", 1, False), ("gru", 2, True)]


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize(
    "kind,layers,bidir", RNN_CASES, ids=[f"{k}-L{n}-bi{int(b)}" for k, n, b in RNN_CASES]
)
def test_rnn(kind, layers, bidir, setting):
    run_case(M.RNNNet(kind, num_layers=layers, bidirectional=bidir), torch.randn(5, 6, 4), setting)


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("bias", [True, False])
def test_multihead_attention_self(setting, bias):
    run_case(M.MHANet(cross=False, bias=bias), torch.randn(5, 6, 8), setting)


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_multihead_attention_cross_kdim_vdim(setting):
    run_case(M.MHANet(cross=True), torch.randn(5, 4, 8), setting, extra_inputs=(torch.randn(5, 7, 5),))


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer(setting, norm_first):
    run_case(M.EncoderLayerNet(norm_first=norm_first), torch.randn(5, 6, 8), setting)


# ----------------------------------------------------------------------------------------------------
# raw parameters, shared and tied weights, frozen parameters, bias-only
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_raw_parameters_vit_style(setting):
    run_case(M.TinyViT(), torch.randn(5, 4, 6), setting)


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_same_linear_applied_twice(setting):
    run_case(M.TwiceLinear(), torch.randn(5, 5), setting)


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("decoder_first", [False, True])
def test_tied_embedding_linear(setting, decoder_first):
    model = M.TiedEmbedLinear(decoder_first=decoder_first)
    ids = torch.randint(0, 13, (5, 6))
    ids[:, :2] = ids[:, 2:4]  # repeated tokens within a sample
    run_case(model, ids, setting)


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_frozen_parameters(setting):
    # check_against_oracle asserts .grad stays None for the frozen ones and matches the oracle for the others
    run_case(M.FrozenNet(), torch.randn(5, 6), setting)


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_bias_only(setting):
    model = M.BiasOnlyNet()
    assert all(n.endswith("bias") for n, p in model.named_parameters() if p.requires_grad)
    run_case(model, torch.randn(5, 3, 5, 5), setting)


# ----------------------------------------------------------------------------------------------------
# generic units: a rule-handled child that reads the module's own input is not run again per sample
# ----------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """ViT-style embeddings: a patch convolution of the input, a cls token and position embeddings (the raw
    parameters make this module generic; the convolution is a child with its own rule). `variant` changes how
    the child is reached."""

    def __init__(self, variant: str, d: int = 6):
        super().__init__()
        self.variant = variant
        self.conv = nn.Conv2d(2, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 5, d) * 0.5)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        if self.variant == "derived":  # the child reads something computed from the input, not the input itself
            t = self.conv(x * 1.0)
        elif self.variant == "param":  # ... computed with one of this module's parameters
            t = self.conv(x * self.scale)
        else:
            t = self.conv(x)
        if self.variant == "inplace":  # the child's output modified in place after the call
            t.mul_(1.5)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t.flatten(2).transpose(1, 2)], dim=1)
        return torch.tanh(t + self.pos) * (self.scale if self.variant == "param" else 1.0)


class PatchNet(nn.Module):
    def __init__(self, variant: str):
        super().__init__()
        self.emb = PatchEmbed(variant)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        if self.emb.variant == "checkpointed":  # nothing is held inside checkpointing: the child re-runs
            from torch.utils.checkpoint import checkpoint

            return self.head(checkpoint(self.emb, x, use_reentrant=False).mean(1))
        return self.head(self.emb(x).mean(1))


@pytest.mark.parametrize("variant", ["input", "derived", "param", "inplace", "checkpointed"])
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_generic_rerun_uses_the_recorded_output_of_a_child_that_reads_its_input(monkeypatch, setting, variant):
    """The per-sample re-run of the embeddings (vmapped) uses the patch convolution's output recorded in forward
    when the convolution read the module's own input; otherwise it runs it. Both against the oracle."""
    import torch.nn.functional as F

    reruns = []
    conv2d = F.conv2d

    def counted(x, *a, **kw):
        if torch._C._functorch.is_functorch_wrapped_tensor(x):  # a call inside the engine's vmapped re-run
            reruns.append(tuple(x.shape))
        return conv2d(x, *a, **kw)

    monkeypatch.setattr(F, "conv2d", counted)
    run_case(PatchNet(variant), torch.randn(5, 2, 8, 8), setting)
    # the engine's backward runs once (the oracle's per-sample gradients are made without vmap)
    assert len(reruns) == (0 if variant == "input" else 1), reruns
