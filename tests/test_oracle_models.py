"""Full Hugging Face models from tiny configs (random init, float64, no dropout, eager attention) against the
one-sample-at-a-time oracle (rel 1e-6). Sequence length differs from batch size everywhere."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import (
    assert_grads_close,
    check_against_oracle,
    engine_grads,
    oracle_grads,
    per_sample_grads,
    spread_C,
)

transformers = pytest.importorskip("transformers")

VOCAB = 100
SETTINGS = [("all-layer", "automatic"), ("layer-wise", "automatic"), ("param-wise", "abadi")]
SETTING_IDS = [f"{g}-{c}" for g, c in SETTINGS]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    model = transformers.GPT2LMHeadModel(cfg).double()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied embeddings
    return model


def llama():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(cfg).double()


def bert():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        pad_token_id=0,
        attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(cfg).double()


def vit():
    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        attn_implementation="eager",
    )
    return transformers.ViTForImageClassification(cfg).double()


def perturb_norms(model):
    """LayerNorm/RMSNorm weights start at exactly 1 and biases at 0; move them off that special point."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "ln_" in n or "LayerNorm" in n:
                p.add_(0.1 * torch.randn_like(p))


# ----------------------------------------------------------------------------------------------------
# losses. The oracle calls each with one-sample slices, so for a batch of 1 each returns that sample's own
# loss.
# ----------------------------------------------------------------------------------------------------
def lm_loss(model, ids):
    """Mean over sequences of the per-sequence mean next-token cross-entropy (computed from the logits)."""
    logits = model(input_ids=ids).logits
    per_tok = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)
    return per_tok.mean(1).mean()


def lm_loss_hf_labels(model, ids):
    """HF's own labels loss: the mean over all B*(T-1) predicted tokens of the batch. With equal-length
    sequences and no ignored (-100) labels every sequence has T-1 tokens, so this equals the mean over
    sequences of the per-sequence token mean, i.e. lm_loss. (HF computes it on logits cast to float32; the
    expected error this adds is ~1e-8 relative, well inside 1e-6.)"""
    return model(input_ids=ids, labels=ids).loss


def cls_loss(model, ids, mask, token_types, labels):
    logits = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types).logits
    return F.cross_entropy(logits, labels)


def image_loss(model, pixels, labels):
    return F.cross_entropy(model(pixel_values=pixels).logits, labels)


def _C(model, loss, inputs, clipping):
    return spread_C(model, loss, inputs) if clipping == "abadi" else 1.0


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("hf_labels", [False, True], ids=["manual-loss", "hf-labels-loss"])
def test_gpt2_lm(setting, hf_labels):
    groups, clipping = setting
    model = gpt2()
    perturb_norms(model)
    ids = torch.randint(0, VOCAB, (4, 10))
    ids[0, 3:6] = ids[0, 0]  # repeated tokens: several rows of the tied embedding get summed contributions
    inputs = (ids,)
    C = _C(model, lm_loss, inputs, clipping)
    if not hf_labels:
        check_against_oracle(model, lm_loss, inputs, C=C, clipping=clipping, groups=groups)
        return
    # the oracle always uses lm_loss: with hf_labels the engine is run with HF's loss (same value, see above)
    ref = copy.deepcopy(model)
    expected = oracle_grads(ref, lm_loss, inputs, batch_size=4, C=C, clipping=clipping, groups=groups)
    got = engine_grads(model, lm_loss_hf_labels, inputs, max_grad_norm=C, clipping=clipping, groups=groups)
    assert_grads_close(got, expected, 1e-6)


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_llama_causal_lm(setting):
    groups, clipping = setting
    model = llama()
    perturb_norms(model)
    ids = torch.randint(0, VOCAB, (4, 11))
    inputs = (ids,)
    check_against_oracle(
        model, lm_loss, inputs, C=_C(model, lm_loss, inputs, clipping), clipping=clipping, groups=groups
    )


def test_llama_hf_labels_loss_matches_manual_loss_nonprivately():
    """Guards the claim in lm_loss_hf_labels' docstring (no engine involved)."""
    model = llama()
    ids = torch.randint(0, VOCAB, (4, 11))
    a = torch.autograd.grad(lm_loss(model, ids), list(model.parameters()))
    b = torch.autograd.grad(lm_loss_hf_labels(model, ids), list(model.parameters()))
    num = torch.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b, strict=True)))
    den = torch.sqrt(sum((x**2).sum() for x in a))
    assert float(num / den) < 1e-7


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_bert_sequence_classification(setting):
    groups, clipping = setting
    model = bert()
    perturb_norms(model)
    B, T = 5, 9
    ids = torch.randint(1, VOCAB, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0  # right padding on some sequences
    mask[3, 4:] = 0
    ids[mask == 0] = 0
    token_types = torch.zeros(B, T, dtype=torch.long)
    token_types[:, 5:] = 1
    labels = torch.tensor([0, 2, 1, 1, 0])
    inputs = (ids, mask, token_types, labels)
    check_against_oracle(
        model, cls_loss, inputs, C=_C(model, cls_loss, inputs, clipping), clipping=clipping, groups=groups
    )


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_vit_image_classification(setting):
    groups, clipping = setting
    model = vit()
    perturb_norms(model)
    with torch.no_grad():  # HF ViT starts cls_token at 0 and position embeddings tiny: make them matter
        model.vit.embeddings.cls_token.normal_(0, 0.5)
        model.vit.embeddings.position_embeddings.normal_(0, 0.5)
    pixels = torch.randn(5, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 1, 0])
    inputs = (pixels, labels)
    check_against_oracle(
        model, image_loss, inputs, C=_C(model, image_loss, inputs, clipping), clipping=clipping, groups=groups
    )


def test_abadi_setting_clips_some_samples_not_others():
    """Sanity of the test design: with C at the median per-sample norm, abadi clips some samples and not
    others."""
    model = gpt2()
    ids = torch.randint(0, VOCAB, (4, 10))
    C = spread_C(model, lm_loss, (ids,))
    _, grads = per_sample_grads(model, lm_loss, (ids,))
    norms = torch.stack([torch.sqrt(sum((v**2).sum() for v in g.values())) for g in grads])
    assert (norms > C).any() and (norms < C).any()


def _masked_image_loss(model, pixels, mask, target):
    out = model(pixel_values=pixels, bool_masked_pos=mask).last_hidden_state
    return F.mse_loss(out[:, 0], target)


def test_vit_embeddings_use_slices_of_the_output_gradient(monkeypatch):
    """ViT's cls token and position embeddings: their per-sample gradients are slices of the embeddings' output
    gradient (`rules.vit`), never the generic re-run, and equal the oracle."""
    from groupclip.rules.generic import GenericRule
    from groupclip.rules.vit import HFViTEmbeddingsRule

    def no_rerun(self, use, bypass):
        raise AssertionError(f"generic re-run of {use.unit.label()}")

    model = vit()
    perturb_norms(model)
    with torch.no_grad():
        model.vit.embeddings.cls_token.normal_(0, 0.5)
        model.vit.embeddings.position_embeddings.normal_(0, 0.5)
    assert HFViTEmbeddingsRule().supports(model.vit.embeddings)
    monkeypatch.setattr(GenericRule, "per_sample_all", no_rerun)
    inputs = (torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 2, 1, 0]))
    check_against_oracle(model, image_loss, inputs, C=spread_C(model, image_loss, inputs), clipping="abadi",
                         groups="param-wise")


@pytest.mark.parametrize("case", ["mask", "interpolate", "dropout"])
def test_vit_embeddings_other_calls_take_the_generic_rerun(monkeypatch, case):
    """A mask token with a mask, interpolated positions, or active dropout: the slices do not apply, the generic
    re-run runs (exact where the module is deterministic: checked against the oracle for the first two)."""
    from groupclip.rules.generic import GenericRule

    calls = []
    rerun = GenericRule.per_sample_all

    def counted(self, use, bypass):
        calls.append(use.unit.qualname)
        return rerun(self, use, bypass)

    monkeypatch.setattr(GenericRule, "per_sample_all", counted)
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, attention_probs_dropout_prob=0.0,
                                 hidden_dropout_prob=0.3 if case == "dropout" else 0.0, attn_implementation="eager")
    model = transformers.ViTModel(cfg, add_pooling_layer=False, use_mask_token=True).double()
    perturb_norms(model)
    with torch.no_grad():
        for p in (model.embeddings.cls_token, model.embeddings.position_embeddings, model.embeddings.mask_token):
            p.normal_(0, 0.5)
    pixels, target = torch.randn(5, 3, 16, 16), torch.randn(5, 32)
    if case == "dropout":
        from oracle import make_engine

        model.train()
        make_engine(model, torch.optim.SGD(model.parameters(), lr=0.0), batch_size=5, max_grad_norm=1.0,
                    groups="param-wise")
        _masked_image_loss(model, pixels.double(), None, target.double()).backward()
        assert calls == ["embeddings"]
        return
    mask = torch.zeros(5, 16, dtype=torch.bool)
    mask[:, ::3] = True
    if case == "interpolate":
        def loss(m, px, mk, tg):
            out = m(pixel_values=px, interpolate_pos_encoding=True).last_hidden_state
            return F.mse_loss(out[:, 0], tg)
    else:
        loss = _masked_image_loss
    inputs = (pixels, mask, target)
    check_against_oracle(model, loss, inputs, C=spread_C(model, loss, inputs), clipping="abadi", groups="param-wise")
    assert calls and set(calls) == {"embeddings"}
