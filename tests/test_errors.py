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
from ivcprune.runtime import applied_pruner

from conftest import make_inputs, make_model


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
        make_method("fast-v")


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
    assert applied_pruner(qwen25) is None


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


def test_copies_of_a_pruned_model_are_clean_unpruned_models(tmp_path):
    """deepcopy / torch.save of a model while a method is applied: the copy carries no live hook and no
    pruner, runs unpruned, and takes a method of its own; the original keeps pruning."""
    import copy

    # a model of its own: once called with output_hidden_states, transformers leaves hooks on a model that
    # pickle cannot save (whatever ivcprune does)
    qwen25 = make_model("qwen2_5_vl")

    inputs = make_inputs(qwen25, media=(("image", 1, 12, 16),))
    with torch.no_grad():
        full = qwen25(**inputs).logits
        method = IVCPrune(layer=2, budget=0.25, rule="fill")
        with method(qwen25):
            pruned = qwen25(**inputs).logits
            twin = copy.deepcopy(qwen25)
            torch.save(qwen25, tmp_path / "model.pt")
            loaded = torch.load(tmp_path / "model.pt", weights_only=False)
            for clone in (twin, loaded):
                assert applied_pruner(clone) is None
                torch.testing.assert_close(clone(**inputs).logits, full)
                other = RandomPrune(layer=2, budget=0.5)
                with other(clone):
                    assert clone(**inputs).logits.shape[1] == other.last_report.kept.numel()
            torch.testing.assert_close(qwen25(**inputs).logits, pruned)  # the original still prunes
        assert pruned.shape[1] < full.shape[1]


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fails the test if a command loads a model: these errors must come before the (slow) load."""
    import ivcprune.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(ivcprune.models, "load_model", refuse)


@pytest.mark.parametrize("argv,message", [
    (["eval", "--model", "toy", "--data", "synthetic", "--n", "0", "--out", "OUT"], "must be a positive integer"),
    (["eval", "--model", "toy", "--data", "synthetic", "--n", "-5", "--out", "OUT"], "must be a positive integer"),
    (["bench", "--model", "random:tiny-qwen2.5-vl", "--repeats", "0"], "must be a positive integer"),
    (["bench", "--model", "random:tiny-qwen2.5-vl", "--image-tokens", "0"], "must be a positive integer"),
    (["bench", "--model", "random:tiny-qwen2.5-vl", "--set", "vision.nope=3"], "has no field 'nope'"),
    (["bench", "--model", "random:no-such-model"], "unknown random config"),
    (["generate", "--model", "./no/such/folder", "--image", "README.md", "--prompt", "p"], "model folder not found"),
    (["generate", "--model", "toy", "--image", "no-such.png", "--prompt", "p"], "image not found"),
    (["generate", "--model", "toy", "--image", "README.md", "--prompt", "p", "--min-pixels", "100",
      "--max-pixels", "10"], "--min-pixels 100 is above --max-pixels 10"),
    (["eval", "--model", "toy", "--data", "synthetic", "--method", "ivc", "--ivc-ratio", "2", "--out", "OUT"],
     "ivc_ratio must be in"),
    (["eval", "--model", "toy", "--data", "synthetic", "--out", "/proc/no-such/out"], "not writable"),
])
def test_cli_user_errors_are_one_line_before_the_model_loads(argv, message, no_model_load, tmp_path, capsys):
    from ivcprune.cli import main

    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as info:
        code = main(argv)
        raise SystemExit(code)
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err + (info.value.code if isinstance(info.value.code, str) else "")
    assert message in err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("ivcprune")]) == 1


def test_ctrl_c_is_one_line_saying_how_to_resume(monkeypatch, capsys):
    import ivcprune.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_eval", interrupted)
    code = cli.main(["eval", "--model", "toy", "--data", "synthetic", "--out", "x"])
    err = capsys.readouterr().err
    assert code == 130 and err.count("\n") == 1 and "run the same command again to resume" in err


def test_a_folder_of_another_run_is_refused_before_the_model_loads(no_model_load, tmp_path, capsys):
    import json

    from ivcprune.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"model_path": "another/model", "benchmark": "synthetic_test",
                                              "method": "none"}))
    (out / "predictions.jsonl").write_text('{"id": "0", "pos": 0}\n')
    assert main(["eval", "--model", "toy", "--data", "synthetic", "--n", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds predictions of another run (model_path differ" in err and err.count("\n") == 1
    (out / "run.json").write_text('{"model_pa')  # damaged: named, before the model loads
    assert main(["eval", "--model", "toy", "--data", "synthetic", "--n", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "run.json is damaged" in err and err.count("\n") == 1
