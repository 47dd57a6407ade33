"""Models dispatched by accelerate (``device_map``): its hooks move weights and activations around every
layer; pruning must compose with them and give the same answers as the plain model."""

from __future__ import annotations

import json

import torch

from ivcprune.cli import main
from ivcprune.evals.synth import make_sample
from ivcprune.inputs import build_inputs, user_message
from ivcprune.methods import make_method, preset_for
from ivcprune.models import load_model, resolve_model_spec

from benchfix import mmbench_tsv


def _generate(model, inputs, method):
    kw = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        if method is None:
            return model.generate(**inputs, **kw)
        with method(model):
            return model.generate(**inputs, **kw)


def test_pruning_under_accelerate_offload_hooks(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    spec = resolve_model_spec("toy")
    plain, processor = load_model(spec, dtype="float32")
    n_layers = plain.config.text_config.num_hidden_layers
    k = preset_for(plain.config.model_type, n_layers).layer
    # layers from K-1 on (the one whose values select, and the first pruned one) live on disk: accelerate
    # loads their weights at each forward through the hooks it wraps around them
    device_map = {"model.visual": "cpu", "model.language_model.embed_tokens": "cpu",
                  "model.language_model.rotary_emb": "cpu", "model.language_model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.language_model.layers.{i}": "cpu" if i < k - 1 else "disk" for i in range(n_layers)})
    dispatched = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        spec, dtype=torch.float32, device_map=device_map, offload_folder=str(tmp_path)).eval()
    layer_k = dispatched.model.language_model.layers[k]
    assert hasattr(layer_k, "_hf_hook") and layer_k.self_attn.q_proj.weight.device.type == "meta"

    s = make_sample(0, "test", 0)
    inputs, _ = build_inputs(processor, user_message(s.question, [s.image]))
    for name in ("none", "ivc"):
        outs, reports = [], []
        for model in (plain, dispatched):
            method = None if name == "none" else make_method("ivc", budget=0.5)
            outs.append(_generate(model, inputs, method))
            reports.append(method.last_report if method else None)
        assert torch.equal(outs[0].sequences, outs[1].sequences)
        for a, b in zip(outs[0].scores, outs[1].scores):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        if name == "ivc":
            assert torch.equal(reports[0].kept, reports[1].kept) and reports[1].layer == k
            assert reports[1].visual_kept == reports[1].visual_tokens // 2


def test_eval_with_device_map_auto_equals_the_default(tmp_path):
    data = mmbench_tsv(tmp_path / "data")
    runs = {}
    for name, extra in (("default", []), ("auto", ["--device-map", "auto"])):
        out = tmp_path / name
        assert main(["eval", "--model", "toy", "--data", str(data), "--out", str(out), "--max-new-tokens", "6",
                     "--quiet", "--methods", "ivc", "--budgets", "0.5", *extra]) == 0
        lines = (out / "predictions.jsonl").read_text().splitlines()
        runs[name] = [{k: v for k, v in json.loads(x).items() if k != "prefill_s"} for x in lines]
    assert runs["auto"] == runs["default"] and len(runs["auto"]) == 5
