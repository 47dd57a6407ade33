"""Bad input gets a clear, actionable error and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch

from ivcprune import (
    IVCPrune,
    RandomPrune,
    UnsupportedCacheError,
    UnsupportedModelError,
    make_method,
)

from conftest import make_inputs


@pytest.mark.parametrize("budget", [0, 0.0, -0.1, 1.01, 2])
def test_budget_out_of_range(budget):
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        IVCPrune(budget=budget)
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        RandomPrune(budget=budget)


def test_bad_knobs():
    with pytest.raises(TypeError):
        IVCPrune(budget="half")
    with pytest.raises(ValueError, match="ivc_ratio"):
        IVCPrune(ivc_ratio=1.5)
    with pytest.raises(ValueError, match="rule"):
        IVCPrune(rule="intersection")
    with pytest.raises(ValueError, match="ablation"):
        IVCPrune(ablation="no_everything")
    with pytest.raises(ValueError, match="budget_tokens"):
        IVCPrune(budget_tokens=0)
    with pytest.raises(ValueError, match="unknown method"):
        make_method("fastv")


@pytest.mark.parametrize("layer", [0, -3])
def test_layer_below_one(layer):
    with pytest.raises(ValueError, match="layer"):
        IVCPrune(layer=layer)


@pytest.mark.parametrize("layer", [4, 40])
def test_layer_not_below_depth(qwen25, layer):
    with pytest.raises(ValueError, match=r"out of range for a model with 4 decoder layers"):
        IVCPrune(layer=layer)(qwen25)  # checked when the method is called on the model
    with pytest.raises(ValueError, match=r"out of range"):
        IVCPrune(layer=layer).apply(qwen25)
    assert getattr(qwen25, "_ivcprune_pruner", None) is None


def test_unsupported_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="qwen2_5_vl"):
        IVCPrune(layer=1)(llama)
    with pytest.raises(UnsupportedModelError):
        IVCPrune(layer=1).apply(torch.nn.Linear(2, 2))


def test_applying_twice(qwen25):
    a, b = IVCPrune(layer=2), RandomPrune(layer=2)
    with a(qwen25):
        with pytest.raises(RuntimeError, match="already applied"):
            b.apply(qwen25)
        with pytest.raises(RuntimeError, match="already applied"):
            a.apply(qwen25)
    b.apply(qwen25)
    b.remove()


def test_static_cache_is_refused(qwen25):
    inputs = make_inputs(qwen25)
    with IVCPrune(layer=2)(qwen25), pytest.raises(UnsupportedCacheError, match="DynamicCache"):
        qwen25.generate(**inputs, max_new_tokens=2, cache_implementation="static", do_sample=False)


def test_multi_token_forward_on_a_pruned_cache_is_refused(qwen25):
    inputs = make_inputs(qwen25)
    with torch.no_grad(), IVCPrune(layer=2)(qwen25):
        out = qwen25(**inputs, use_cache=True)
        with pytest.raises(RuntimeError, match="pruned"):
            qwen25(input_ids=torch.tensor([[5, 6]]), past_key_values=out.past_key_values, use_cache=True)


def test_inputs_embeds_without_ids_is_a_reported_noop(qwen25):
    inputs = make_inputs(qwen25, media=())
    embeds = qwen25.get_input_embeddings()(inputs["input_ids"])
    p = IVCPrune(layer=2)
    with torch.no_grad(), p(qwen25):
        qwen25(inputs_embeds=embeds)
    assert not p.last_report.pruned and "inputs_embeds" in p.last_report.reason
