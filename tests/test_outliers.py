"""LLM.int8's outlier columns on random weights (harness.predict.outliers): the chance that a value of each
kind of input passes the threshold, against sampled values of the same init."""

import math

import pytest
import torch

from harness.predict import outliers
from harness.predict.analytic import shape_of
from harness.step.models import resolve_source


def _sampled_share(act, sigma: float, gated: bool, threshold: float, n: int = 4_000_000) -> float:
    generator = torch.Generator().manual_seed(0)
    g = torch.randn(n, generator=generator, dtype=torch.float64) * sigma
    value = act(g) * (torch.randn(n, generator=generator, dtype=torch.float64) * sigma if gated else 1.0)
    return (value.abs() >= threshold).double().mean().item()


@pytest.mark.parametrize("activation, act, gated, spread", [
    ("silu", torch.nn.functional.silu, True, 1.0),
    ("gelu_pytorch_tanh", lambda x: torch.nn.functional.gelu(x, approximate="tanh"), True, 1.0),
    ("gelu_new", lambda x: torch.nn.functional.gelu(x, approximate="tanh"), False, 1.6),  # GPT-2's, ungated
])
def test_the_mlp_product_s_share_past_the_threshold_is_what_sampling_the_init_gives(activation, act, gated, spread):
    shape = shape_of(resolve_source("llama-2-7b").config)  # s^2 h = 0.02^2 x 4096
    sigma = spread * shape.init_std * math.sqrt(shape.hidden)
    assert shape.init_std * math.sqrt(shape.hidden) == pytest.approx(1.28)
    integrated = outliers._product_share(activation, sigma, gated, 6.0)
    assert integrated == pytest.approx(_sampled_share(act, sigma, gated, 6.0), rel=0.05)
    assert 1e-4 < integrated < 1e-2


def test_normalised_and_attention_inputs_are_gaussian_and_unknown_activations_are_refused():
    shape = shape_of(resolve_source("llama-2-7b").config)
    assert outliers.value_share(outliers.NORMALISED, shape, 6.0) == pytest.approx(math.erfc(6 / math.sqrt(2)))
    assert outliers.value_share(outliers.NORMALISED, shape, 6.0) < 1e-8
    assert outliers.value_share(outliers.ATTENTION, shape, 6.0) == pytest.approx(math.erfc(6 / (1.28 * math.sqrt(2))))
    with pytest.raises(ValueError, match="mystery"):
        outliers._product_share("mystery", 1.0, True, 6.0)


def test_a_column_is_an_outlier_where_any_of_its_rows_is():
    assert outliers.columns(512, 4096, 0.0) == 0
    assert outliers.columns(1, 10_000, 0.01) == 100
    assert outliers.columns(10**6, 4096, 0.01) == 4096
    assert outliers.columns(100, 1000, 0.01) == round(1000 * (1 - 0.99 ** 100))


def test_a_layer_s_role_comes_from_its_name_and_where_names_repeat_from_its_width():
    from transformers import GPT2Config

    gpt2 = shape_of(GPT2Config(n_embd=256, n_layer=2, n_head=8))
    assert outliers.role_of("c_proj", gpt2.hidden, gpt2) == "o"
    assert outliers.role_of("c_proj", gpt2.intermediate, gpt2) == "down"
    assert outliers.role_of("c_fc", gpt2.hidden, gpt2) == "up"
    with pytest.raises(ValueError, match="lm_head"):
        outliers.role_of("lm_head", gpt2.hidden, gpt2)
