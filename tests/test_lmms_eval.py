"""lmms-eval runs the model ``ivcprune`` end to end: a tiny local grounding task (written here), the
embedded toy model, the real ``lmms_eval`` command line, nothing downloaded."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ivcprune.evals import synth  # noqa: E402
from ivcprune.integrations.lmms_eval import (  # noqa: E402
    IVCPruneLMM,
    build_method,
    cut_at_stops,
    generation_settings,
    split_visuals,
)
from ivcprune.methods import IVCPrune, RandomPrune  # noqa: E402
from ivcprune.models import TOY_DIR  # noqa: E402

TASK = "ivcprune_toy_grounding"
N_DOCS = 3
MAX_NEW_TOKENS = 24
ENTRY_POINT = "ivcprune.integrations.lmms_eval_plugin:model_manifests"

TASK_UTILS = '''
import re

from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def _box(text):
    m = re.search(r"\\[\\s*(-?\\d+)\\s*,\\s*(-?\\d+)\\s*,\\s*(-?\\d+)\\s*,\\s*(-?\\d+)\\s*\\]", text)
    return [int(v) for v in m.groups()] if m else None


def _iou(a, b):
    if a is None or b is None:
        return 0.0
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def process_results(doc, results):
    return {"acc": float(_iou(_box(results[0]), _box(doc["answer"])) >= 0.5)}

'''

TASK_YAML = """
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
process_results: !function utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The toy model is tiny: one thread is fastest (several spin against each other on a busy machine),
    and the in-process runs then match the lmms-eval subprocess, which gets one thread too."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A task folder for ``--include_path``: YAML, utils.py, a JSONL dataset and its PNG images."""
    root = tmp_path_factory.mktemp("lmms_task")
    rows = []
    for i in range(N_DOCS):
        s = synth.make_sample(0, "test", i)
        image = root / f"image{i}.png"
        s.image.save(image)
        rows.append({"id": i, "image": str(image), "question": s.question, "answer": s.answer})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "utils.py").write_text(TASK_UTILS)
    (root / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data, max_new_tokens=MAX_NEW_TOKENS))
    return root


def run_lmms_eval(task_dir: Path, tmp: Path, model_args: str, *, registration: str, nproc: int = 1,
                  batch_size: int = 1) -> tuple[dict, list[dict]]:
    """``python -m lmms_eval`` in a subprocess (under ``torchrun`` with ``nproc`` processes when > 1);
    returns (results.json, logged samples in doc order).

    ``registration``: ``"entry_point"`` (a distribution on PYTHONPATH declares the ``lmms_eval.models``
    entry point, as an installed ivcprune does) or ``"plugins"`` (``LMMS_EVAL_PLUGINS``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "LMMS_EVAL_PLUGINS"}
    env.update(HF_HOME=str(tmp / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    if registration == "plugins":
        env["LMMS_EVAL_PLUGINS"] = "ivcprune.integrations.lmms_eval_plugin"
    else:
        dist = tmp / "entry" / "ivcprune_lmms_eval_entry-0.0.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ivcprune-lmms-eval-entry\nVersion: 0.0\n")
        (dist / "entry_points.txt").write_text(f"[lmms_eval.models]\nivcprune = {ENTRY_POINT}\n")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(dist.parent), env.get("PYTHONPATH")) if p)
    out = tmp / "out"
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc-per-node", str(nproc)]
    cmd = [*launch, "-m", "lmms_eval", "--model", "ivcprune", "--model_args", model_args,
           "--tasks", TASK, "--include_path", str(task_dir), "--output_path", str(out), "--log_samples",
           "--batch_size", str(batch_size), "--verbosity", "WARNING"]
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    results = sorted(out.rglob("*_results.json"))
    samples = sorted(out.rglob(f"*_samples_{TASK}.jsonl"))
    # lmms-eval reports errors in its log and still exits 0: the files are the evidence.
    assert proc.returncode == 0 and results and samples, (proc.stdout[-3000:], proc.stderr[-3000:])
    rows = [json.loads(x) for x in samples[0].read_text().splitlines() if x.strip()]
    return json.loads(results[0].read_text()), sorted(rows, key=lambda r: r["doc_id"])


def direct_answers(task_dir: Path, method=None) -> list[str]:
    """The same prompts through transformers' processor and ``model.generate`` alone."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(TOY_DIR).eval()
    processor = AutoProcessor.from_pretrained(TOY_DIR)
    answers = []
    for line in (task_dir / "data.jsonl").read_text().splitlines():
        doc = json.loads(line)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": doc["question"]}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image = Image.open(doc["image"]).convert("RGB")
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.inference_mode(), (method(model) if method else contextlib.nullcontext()):
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        answers.append(processor.tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    # lmms-eval strips the whitespace around each response it logs (a malformed answer may end in a space)
    return [a.strip() for a in answers]


# -- end to end: the lmms_eval command line ---------------------------------------------------------
def test_ivc_prune_through_the_entry_point(task_dir, tmp_path):
    log = tmp_path / "prune.jsonl"
    results, samples = run_lmms_eval(
        task_dir, tmp_path, f"pretrained=toy,method=ivc,budget=0.5,prune_log={log}", registration="entry_point"
    )
    assert results["config"]["model_backend"].startswith("ivcprune.integrations.lmms_eval.IVCPruneLMM")
    assert results["n-samples"][TASK]["effective"] == N_DOCS
    assert 0.0 <= results["results"][TASK]["acc,none"] <= 1.0
    assert [s["doc_id"] for s in samples] == list(range(N_DOCS))
    reports = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(r["task"], r["doc_id"]) for r in reports] == [(TASK, i) for i in range(N_DOCS)]
    for r in reports:  # 448x448 images: 256 visual tokens, half of them kept from layer K=3 on
        assert (r["method"], r["layer"], r["visual_tokens"], r["visual_kept"]) == ("ivc", 3, 256, 128)
        assert r["kept_visual_ratio"] == pytest.approx(0.5)
    # the answers are exactly those of IVC-Prune applied by hand
    assert [s["filtered_resps"] for s in samples] == direct_answers(task_dir, IVCPrune(budget=0.5))


def test_batched_answers_equal_batch_size_1(task_dir, tmp_path):
    """``--batch_size 2``: the 3 documents go as a batch of 2 and one of 1; every answer is IVC-Prune's
    applied by hand to the prompt alone, as with batch size 1 above."""
    log = tmp_path / "prune.jsonl"
    results, samples = run_lmms_eval(task_dir, tmp_path, f"pretrained=toy,method=ivc,budget=0.5,prune_log={log}",
                                     registration="plugins", batch_size=2)
    assert results["n-samples"][TASK]["effective"] == N_DOCS
    assert [s["doc_id"] for s in samples] == list(range(N_DOCS))
    assert [s["filtered_resps"] for s in samples] == direct_answers(task_dir, IVCPrune(budget=0.5))
    reports = [json.loads(x) for x in log.read_text().splitlines()]
    assert sorted(r["doc_id"] for r in reports) == list(range(N_DOCS))
    assert all((r["visual_tokens"], r["visual_kept"]) == (256, 128) for r in reports)


def test_unpruned_answers_equal_model_generate(task_dir, tmp_path):
    results, samples = run_lmms_eval(task_dir, tmp_path, "pretrained=toy,method=none", registration="plugins")
    assert results["n-samples"][TASK]["effective"] == N_DOCS
    answers = [s["filtered_resps"] for s in samples]
    assert all(answers)
    assert answers == direct_answers(task_dir)


def test_two_processes_equal_one(task_dir, tmp_path):
    """torchrun with 2 processes (gloo on the CPU): lmms-eval shards the 3 documents (one rank gets a
    padding request) and gathers them; every answer and score equals the 1-process run's."""
    args = "pretrained=toy,method=ivc,budget=0.5,prune_log={log}"
    one, one_samples = run_lmms_eval(task_dir, tmp_path / "one", args.format(log=tmp_path / "one.jsonl"),
                                     registration="plugins")
    two, two_samples = run_lmms_eval(task_dir, tmp_path / "two", args.format(log=tmp_path / "two.jsonl"),
                                     registration="plugins", nproc=2)
    assert two["n-samples"][TASK]["effective"] == N_DOCS
    assert [(s["doc_id"], s["filtered_resps"]) for s in two_samples] == \
        [(s["doc_id"], s["filtered_resps"]) for s in one_samples]
    assert two["results"][TASK] == one["results"][TASK]
    # one prune log per rank; together they cover every document once, rank r taking r, r + 2, ...
    logs = {r: [json.loads(x) for x in (tmp_path / f"two.rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    real = {r: sorted({e["doc_id"] for e in entries}) for r, entries in logs.items()}
    assert real == {0: [0, 2], 1: [1]}
    assert all(e["visual_kept"] == 128 for entries in logs.values() for e in entries)
    assert not (tmp_path / "two.jsonl").exists()


def test_entry_point_is_declared_by_the_installed_package():
    from importlib.metadata import entry_points

    declared = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "ivcprune"]
    if not any(ep.value == ENTRY_POINT and ep.dist and ep.dist.name == "ivcprune" for ep in declared):
        pytest.skip("this ivcprune install declares no lmms_eval.models entry point (pyproject.toml)")
    (manifest,) = next(ep for ep in declared if ep.value == ENTRY_POINT).load()()
    assert manifest.model_id == "ivcprune"
    assert manifest.simple_class_path == "ivcprune.integrations.lmms_eval.IVCPruneLMM"


# -- the model class in process ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    return IVCPruneLMM(pretrained="toy", method="ivc", budget=0.5)


def _instance(request_type: str, arguments: tuple, doc_id: int = 0):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=request_type, arguments=arguments, idx=0,
                    metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def test_generate_until_cuts_at_stop_strings(lm):
    s = synth.make_sample(0, "test", 0)
    lm.task_dict = {"t": {"test": [{"image": s.image, "question": s.question}]}}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    full, cut = lm.generate_until([
        _instance("generate_until", (s.question, {"max_new_tokens": 8, "until": ["\n\n"]}, visual, 0, "t", "test")),
        _instance("generate_until", (s.question, {"max_new_tokens": 8, "until": [": "]}, visual, 0, "t", "test")),
    ])
    assert full.startswith('{"label": "')
    assert cut == '{"label"'
    assert [r["kept_visual_ratio"] for r in lm.reports[-2:]] == [0.5, 0.5]
    assert lm.mean_kept_visual_ratio == pytest.approx(0.5)


@pytest.mark.parametrize("method", ["ivc", "none"])
def test_generate_until_batched_equals_one_at_a_time(lm, method):
    """batch_size 3 over 5 requests of different image sizes (one without an image) and two sets of
    generation kwargs: the answers (in request order) and reports equal batch size 1's."""
    one = lm if method == "ivc" else IVCPruneLMM(pretrained="toy", method="none")
    three = IVCPruneLMM(pretrained="toy", method=method, budget=0.5, batch_size=3)
    assert three.batch_size == 3
    sizes = [(448, 448), (600, 300), None, (520, 390), (300, 600)]
    docs = []
    for i, size in enumerate(sizes):
        s = synth.make_sample(0, "test", i)
        docs.append({"image": s.image.resize(size) if size else None, "question": s.question})
    visual = lambda doc: [doc["image"]] if doc["image"] is not None else []  # noqa: E731
    kwargs = [{"max_new_tokens": 12, "until": ["\n\n"]}, {"max_new_tokens": 8, "until": ['",']}]
    requests = [_instance("generate_until", (d["question"], kwargs[i % 2], visual, i, "t", "test"), doc_id=i)
                for i, d in enumerate(docs)]
    answers = {}
    for model in (one, three):
        model.task_dict = {"t": {"test": docs}}
        n = len(model.reports)
        answers[model.batch_size] = model.generate_until(requests)
        answers[model.batch_size, "reports"] = sorted(model.reports[n:], key=lambda r: r["doc_id"])
    assert answers[3] == answers[1] and all(isinstance(a, str) for a in answers[3])
    # (the runtime words the no-image row's reason differently when other rows of its batch have images)
    without_reason = lambda reports: [{k: v for k, v in r.items() if k != "reason"} for r in reports]  # noqa: E731
    assert without_reason(answers[3, "reports"]) == without_reason(answers[1, "reports"])
    assert [r["visual_tokens"] for r in answers[1, "reports"]] == [256, 276, 0, 234, 276]


def test_generate_until_multi_round(lm):
    s = synth.make_sample(0, "test", 1)
    lm.task_dict = {"t": {"test": [{"image": s.image}]}}
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 1:
            return [doc["image"]], "Locate the largest object.", False, previous_output, {"round": 1}
        return None, None, True, previous_output, None

    n = len(lm.reports)
    (outputs,) = lm.generate_until_multi_round([
        _instance("generate_until_multi_round",
                  (s.question, {"max_new_tokens": 6}, lambda doc: [doc["image"]], doc_to_text, 0, "t", "test")),
    ])
    assert len(outputs) == 2 and all(isinstance(o, str) and o for o in outputs)
    assert [r for r, _, _ in seen] == [1, 2] and seen[1][1] == outputs and seen[1][2] == {"round": 1}
    assert len(lm.reports) == n + 2


def _greedy_with_scores(model, inputs, method, n: int):
    """Greedy continuation of ``n`` tokens by ``model.generate`` and its log-probability."""
    with torch.inference_mode(), (method(model) if method else contextlib.nullcontext()):
        g = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_scores=True,
                           return_dict_in_generate=True)
    new = g.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return new, sum(float(torch.log_softmax(sc[0].float(), -1)[t]) for sc, t in zip(g.scores, new, strict=True))


@pytest.mark.parametrize("method", ["ivc", "none"])
def test_loglikelihood_equals_generate_scores(lm, method):
    """The continuation's log-probability is the one ``generate`` scores token by token (pruned: the same
    pruned cache), and a continuation generate would not produce is not greedy."""
    model = lm if method == "ivc" else IVCPruneLMM(pretrained="toy", method="none")
    s = synth.make_sample(0, "test", 2)
    model.task_dict = {"t": {"test": [{"image": s.image, "question": s.question}]}}
    inputs = model.prepare(s.question, [s.image])
    new, expected = _greedy_with_scores(model.model, inputs, IVCPrune(budget=0.5) if method == "ivc" else None, 6)
    continuation = model.tokenizer.decode(new)
    assert model.tokenizer(continuation, add_special_tokens=False)["input_ids"] == new
    visual = lambda doc: [doc["image"]]  # noqa: E731
    target = lambda doc: continuation  # noqa: E731  (output_type loglikelihood passes doc_to_target)
    (lp, greedy), (lp_other, greedy_other) = model.loglikelihood([
        _instance("loglikelihood", (s.question, target, visual, 0, "t", "test")),
        _instance("loglikelihood", (s.question, '{"label": "nothing"}', visual, 0, "t", "test")),
    ])
    assert lp == pytest.approx(expected, abs=1e-5) and greedy
    assert lp_other < lp and not greedy_other
    assert [r["kept_visual_ratio"] for r in model.reports[-2:]] == ([0.5, 0.5] if method == "ivc" else [1.0, 1.0])


# -- arguments --------------------------------------------------------------------------------------
def test_argument_errors(monkeypatch):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        IVCPruneLMM(pretrained="toy", batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        IVCPruneLMM(pretrained="toy", batch_size="auto")
    with pytest.raises(TypeError, match="has no knob"):
        IVCPruneLMM(pretrained="toy", budgett=0.5)
    with pytest.raises(ValueError, match="pretrained"):
        IVCPruneLMM()
    with pytest.raises(ValueError, match="layer K=9 is out of range"):
        IVCPruneLMM(pretrained="toy", layer=9)
    monkeypatch.setenv("WORLD_SIZE", "2")  # data parallel: one model per process, not one over all GPUs
    with pytest.raises(ValueError, match="device_map=auto spreads one model"):
        IVCPruneLMM(pretrained="toy", device_map="auto")


def test_build_method():
    assert build_method("none", budget=0.5) is None
    rnd = build_method("random", budget=0.25, seed=3)
    assert isinstance(rnd, RandomPrune) and (rnd.budget, rnd.seed) == (0.25, 3)
    ivc = build_method("ivc", layer=2, budget=0.5, ivc_ratio=0.2, rule="fill")
    assert isinstance(ivc, IVCPrune) and (ivc.layer, ivc.ivc_ratio, ivc.rule) == (2, 0.2, "fill")
    with pytest.raises(TypeError, match="has no knob ivc_ratio"):
        build_method("random", ivc_ratio=0.1)
    with pytest.raises(ValueError, match="method must be one of"):
        build_method("no_such_method")


def test_generation_settings_and_stops():
    kw, stops = generation_settings({"max_new_tokens": 7, "temperature": 0, "until": ["\n\n", "</s>"]}, 256)
    assert kw == {"max_new_tokens": 7, "do_sample": False} and stops == ["</s>"]
    kw, stops = generation_settings({"temperature": 0.7, "top_p": 0.9, "until": "END"}, 256)
    assert kw == {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7, "top_p": 0.9} and stops == ["END"]
    assert cut_at_stops("a END b STOP c", ["STOP", "END"]) == "a "
    assert cut_at_stops("abc", []) == "abc"
    with pytest.raises(ValueError, match="until"):
        generation_settings({"until": 3}, 8)


def test_split_visuals():
    img = Image.new("RGB", (8, 8))
    assert split_visuals(None) == ([], [])
    assert split_visuals([img, "a.jpg", "b.MP4"]) == ([img, "a.jpg"], ["b.MP4"])
    with pytest.raises(TypeError, match="unsupported visual"):
        split_visuals([{"array": [0.0], "sampling_rate": 16000}])
