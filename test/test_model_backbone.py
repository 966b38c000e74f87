"""Sequence models: prefix reuse equals the full pass, causality, ED-Ma aggregation."""

import pytest
import torch

from mail_ros.model.backbone import build_sequence_model, select_state
from mail_ros.model.mamba_stack import MambaStack
from mail_ros.model.transformer import TransformerStack

torch.set_num_threads(1)

SIZES = dict(d_model=16, n_layers=2, n_enc=2, n_dec=2, d_state=4, d_conv=4, d_conv_dec=2, expand=2, heads=2, dropout=0.1)
VARIANTS = [("mamba", "decoder"), ("mamba", "encoder_decoder"), ("transformer", "decoder"), ("transformer", "encoder_decoder")]


def _model(kind, layout):
    torch.manual_seed(0)
    model = build_sequence_model(kind, layout, max_context=7, n_actions=3, **SIZES).eval()
    # Non-trivial learnable tokens (they start near zero).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_tokens"):
                param.normal_()
    return model


@pytest.mark.parametrize("kind,layout", VARIANTS)
@pytest.mark.parametrize("context_len", [1, 4, 7])
def test_prefill_then_extend_equals_forward(kind, layout, context_len):
    model = _model(kind, layout)
    context, actions = torch.randn(2, context_len, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        full = model(context, actions)
        state = model.prefill(context)
        assert torch.allclose(model.extend(actions, state), full, atol=1e-5)
        # The state is not consumed: a second continuation gives its own exact answer.
        other = torch.randn(2, 3, 16)
        assert torch.allclose(model.extend(other, state), model(context, other), atol=1e-5)
    assert full.shape == (2, 3, 16)


@pytest.mark.parametrize("kind,layout", VARIANTS)
def test_batched_prefix_rows_match_single_prefixes(kind, layout):
    model = _model(kind, layout)
    contexts, actions = torch.randn(3, 5, 16), torch.randn(1, 3, 16)
    with torch.no_grad():
        state = model.prefill(contexts)
        for row in range(3):
            out = model.extend(actions, select_state(state, slice(row, row + 1)))
            assert torch.allclose(out, model(contexts[row : row + 1], actions), atol=1e-5)


@pytest.mark.parametrize("stack", [MambaStack(2, 16, 4), TransformerStack(2, 16, 2, 0.0)], ids=["mamba", "transformer"])
def test_stacks_are_causal(stack):
    x = torch.randn(1, 8, 16)
    y = x.clone()
    y[:, 5:] = torch.randn(1, 3, 16)
    with torch.no_grad():
        assert torch.allclose(stack(x)[:, :5], stack(y)[:, :5], atol=1e-6)
        assert not torch.allclose(stack(x)[:, 5:], stack(y)[:, 5:])


def test_mamba_aggregation_adds_memory_after_every_layer():
    stack = MambaStack(3, 16, 4).eval()
    x, memory = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    with torch.no_grad():
        expected = x
        for layer in stack.layers:
            expected = expected + layer.mixer(layer.norm(expected)) + memory
        assert torch.allclose(stack(x, memory=memory), stack.norm(expected), atol=1e-6)
        # Memory changes every position of the output (added to the residual stream).
        assert not torch.allclose(stack(x, memory=memory)[:, 0], stack(x)[:, 0])


def test_ed_ma_encoder_and_decoder_sequences_have_equal_length():
    model = _model("mamba", "encoder_decoder")
    context, actions = torch.randn(1, 4, 16), torch.randn(1, 3, 16)
    lengths = {}
    model.encoder.register_forward_hook(lambda m, args, kwargs, out: lengths.__setitem__("enc", args[0].shape[1]), with_kwargs=True)
    model.decoder.register_forward_hook(lambda m, args, kwargs, out: lengths.__setitem__("dec", args[0].shape[1]), with_kwargs=True)
    with torch.no_grad():
        model(context, actions)
    assert lengths == {"enc": 7, "dec": 7}


def test_transformer_dropout_only_in_training():
    stack = TransformerStack(2, 16, 2, dropout=0.5)
    x = torch.randn(1, 5, 16)
    stack.train()
    assert not torch.allclose(stack(x), stack(x))
    stack.eval()
    assert torch.equal(stack(x), stack(x))
