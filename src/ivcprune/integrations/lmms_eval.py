"""lmms-eval model ``ivcprune``: any lmms-eval task on a checkpoint of a supported family (Qwen2-VL,
Qwen2.5-VL, LLaVA-1.5, InternVL), with its visual tokens pruned.

    lmms-eval --model ivcprune \\
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,method=ivc,budget=0.5 \\
        --tasks mme --output_path runs/lmms --log_samples

lmms-eval finds the model through this package's ``lmms_eval.models`` entry point; where the package was
installed without it, ``LMMS_EVAL_PLUGINS=ivcprune.integrations.lmms_eval_plugin`` registers it instead.

Model arguments (``--model_args``, comma-separated ``key=value``):

- ``pretrained``: local path, hub id, or ``toy`` (the embedded grounding model);
- ``method``: ``ivc`` (default), ``random`` or ``none`` (the unpruned reference; it ignores the pruning
  arguments);
- ``layer``, ``budget``, ``budget_tokens``: K and the budget (the model's preset where left out);
  ``ivc_ratio``, ``seed_ratio``, ``rule``, ``foreground_ratio``, ``ablation``: IVC-Prune's knobs;
  ``seed``: the random baseline's seed;
- ``dtype`` (``auto``, ``bf16``, ``fp16``, ``fp32``), ``attn_implementation``, ``device_map`` (else
  lmms-eval's ``--device``, else ``auto`` where CUDA is available and the CPU elsewhere);
- ``min_pixels``, ``max_pixels``: bounds of the image resizing of Qwen-VL models (qwen-vl-utils' defaults
  where left out); ``max_tiles``: InternVL's tiles per image at most (the processor's ``max_patches`` where left
  out); LLaVA's processor sizes images itself;
- ``max_new_tokens``: used when a task sets none (256); ``system_prompt``: a system turn, or a file
  holding it (the chat template's default otherwise);
- ``prune_log``: a JSONL file to which one line per request is appended (task, doc id, visual tokens kept).

``generate_until`` runs ``--batch_size N`` requests at a time (default 1) through
:func:`ivcprune.generation.generate_batch`: requests with the same generation kwargs are batched together,
each window of 8 batches sorted by image size (less padding), left-padded; every answer equals the one
its request gets with batch size 1 (greedy decoding; sampling draws differ with the batch).
``generate_until_multi_round`` (each round depends on the last answer) and ``loglikelihood`` run one
request at a time whatever the batch size. (lmms-eval 0.7.3 itself turns every model's
loglikelihood results into strings before its ``multiple_choice`` / ``loglikelihood`` tasks score them,
so those task types fail there whatever the model.) Videos (paths from ``doc_to_visual``) take
qwen-vl-utils' default sampling and size (Qwen-VL models only).

Several processes (``torchrun --nproc-per-node N -m lmms_eval ...``, or ``accelerate launch``) run data
parallel: lmms-eval gives each rank its share of the documents and gathers the results; each process
loads the whole model on the GPU of its local rank (the CPU without CUDA; an explicit ``device_map``
other than ``auto`` is kept), and ``prune_log`` gets one file per rank (``NAME.rankR.jsonl``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from loguru import logger  # lmms-eval's logger
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("the lmms-eval integration needs lmms-eval: pip install 'ivcprune[lmms-eval]'") from err

from ..families import get_adapter
from ..generation import Generation, Request, generate_batch, sorted_batches
from ..inputs import build_inputs
from ..methods import PruningMethod, make_method, method_names
from ..models import load_model, resolve_model_spec

MODEL_NAME = "ivcprune"
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
# lmms-eval gives every generation task without `until` the few-shot delimiter as a stop string; chat
# models answer in paragraphs, so (as lmms-eval's own Qwen-VL models do) it is not applied.
FEWSHOT_DELIMITER = "\n\n"
DEFAULT_MAX_NEW_TOKENS = 256


def build_method(name: str, **knobs: Any) -> PruningMethod | None:
    """The pruning method of the model arguments (any registered method and its knobs); ``None`` for ``none``."""
    if name not in method_names():
        raise ValueError(f"method must be one of {', '.join(method_names())}, got {name!r}")
    return make_method(name, **knobs)


def generation_settings(
    gen_kwargs: dict[str, Any] | None, default_max_new_tokens: int
) -> tuple[dict[str, Any], list[str]]:
    """lmms-eval generation kwargs -> (``model.generate`` kwargs, stop strings cut from the answer).

    Temperature 0 (or none) is greedy decoding; above 0 samples with that temperature (and ``top_p`` /
    ``top_k`` when given)."""
    g = dict(gen_kwargs or {})
    until = g.get("until")
    if until is None:
        stops: list[str] = []
    elif isinstance(until, str):
        stops = [until]
    elif isinstance(until, (list, tuple)):
        stops = [str(s) for s in until]
    else:
        raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {type(until).__name__}")
    stops = [s for s in stops if s and s != FEWSHOT_DELIMITER]
    max_new = g.get("max_new_tokens") or g.get("max_gen_toks") or default_max_new_tokens
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new)}
    temperature = float(g.get("temperature") or 0.0)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature)
        if g.get("top_p") is not None:
            kwargs["top_p"] = float(g["top_p"])
        if g.get("top_k") is not None:
            kwargs["top_k"] = int(g["top_k"])
    else:
        kwargs["do_sample"] = False
    num_beams = int(g.get("num_beams") or 1)
    if num_beams > 1:
        kwargs["num_beams"] = num_beams
    return kwargs, stops


def cut_at_stops(text: str, stops: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    end = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            end = min(end, i)
    return text[:end]


def split_visuals(visuals: Any) -> tuple[list[Any], list[str]]:
    """``doc_to_visual`` output -> (images, video paths): PIL images and image paths, video files by suffix."""
    if visuals is None:
        return [], []
    if isinstance(visuals, (Image.Image, str, os.PathLike)):
        visuals = [visuals]
    images: list[Any] = []
    videos: list[str] = []
    for v in visuals:
        if isinstance(v, Image.Image):
            images.append(v)
        elif isinstance(v, (str, os.PathLike)):
            path = str(v)
            (videos if path.lower().endswith(VIDEO_SUFFIXES) else images).append(path)
        else:
            raise TypeError(
                f"unsupported visual of type {type(v).__name__}: the ivcprune model takes PIL images, "
                "image paths and video paths"
            )
    return images, videos


def parse_batch_size(value: int | str | None) -> int:
    """lmms-eval's ``--batch_size`` (an int, or its text) -> a positive int; ``auto`` is not supported."""
    text = str(value if value is not None else 1)
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{MODEL_NAME}: batch_size must be a positive integer, got {value!r}")
    return int(text)


def visual_size(visuals: Any) -> tuple[int, int]:
    """Sort key of a request's visuals: (count, pixels of its PIL images); paths count as 0 pixels."""
    items = visuals if isinstance(visuals, (list, tuple)) else [] if visuals is None else [visuals]
    return len(items), sum(v.width * v.height for v in items if isinstance(v, Image.Image))


class IVCPruneLMM(lmms):
    """lmms-eval model: a checkpoint of a supported family answering under a pruning method.

    After a run, :attr:`reports` holds one dict per request (``task``, ``split``, ``doc_id``,
    ``visual_tokens``, ``visual_kept``, ``kept_visual_ratio``, ...), and :attr:`mean_kept_visual_ratio`
    their mean over requests with visual tokens.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        method: str = "ivc",
        dtype: str = "auto",
        attn_implementation: str | None = None,
        device_map: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_tiles: int | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        system_prompt: str | None = None,
        prune_log: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        **knobs: Any,
    ) -> None:
        super().__init__()
        if pretrained is None:
            raise ValueError("--model_args pretrained=PATH is required (a local path, a hub id or toy)")
        self._batch_size = parse_batch_size(batch_size)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # data parallel (torchrun / accelerate launch): lmms-eval has set up the process group, shards
            # the documents by rank and gathers the results; each process holds the whole model
            if device_map == "auto":
                raise ValueError(f"device_map=auto spreads one model over all GPUs: run {MODEL_NAME} as one "
                                 "process for that, or leave device_map out to get one GPU per process")
            self._rank, self._world_size = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
            if device_map is None:  # not lmms-eval's --device, which names one device for every rank
                device_map = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
        spec = resolve_model_spec(str(pretrained))
        if spec.startswith("random:"):
            raise ValueError("random:NAME models have no processor; pass a checkpoint path, a hub id or toy")

        try:  # every other model argument is a knob of the method (layer, budget, ivc_ratio, seed, ...)
            self.method = build_method(str(method), **knobs)
        except TypeError as e:
            raise TypeError(f"{MODEL_NAME}: {e}") from None
        if device_map is None:
            device_map = device or ("auto" if torch.cuda.is_available() else None)
        self._model, self.processor = load_model(
            spec, dtype=dtype, attn_implementation=attn_implementation, device_map=device_map
        )
        self._device = self._model.device
        self.method_config: dict[str, Any] = {"method": "none"}
        if self.method is not None:
            self.method_config = self.method.resolve(get_adapter(self._model))  # fails early on a bad K / model
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_tiles = int(max_tiles) if max_tiles is not None else None
        self.max_new_tokens = int(max_new_tokens)
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None
        self.prune_log = Path(prune_log) if prune_log else None
        if self.prune_log is not None and self.world_size > 1:  # one file per process: no interleaved lines
            self.prune_log = self.prune_log.with_name(f"{self.prune_log.stem}.rank{self.rank}{self.prune_log.suffix}")
        if self.prune_log is not None:
            self.prune_log.parent.mkdir(parents=True, exist_ok=True)
        self.reports: list[dict[str, Any]] = []
        logger.info(f"{MODEL_NAME}: {spec} with {self.method_config}")

    # -- what lmms-eval reads ----------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def mean_kept_visual_ratio(self) -> float | None:
        """Mean kept fraction of visual tokens over the requests that had any (``None`` before)."""
        ratios = [r["kept_visual_ratio"] for r in self.reports if r["visual_tokens"]]
        return sum(ratios) / len(ratios) if ratios else None

    # -- requests ----------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order; ``batch_size`` requests with the same generation kwargs at a time."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # batch size 1 keeps the request order
            key = json.dumps(req.args[1], sort_keys=True, default=str) if self.batch_size > 1 else ""
            groups.setdefault(key, []).append(i)
        bar = tqdm(total=len(requests), desc=MODEL_NAME, disable=self.rank != 0)
        for indices in groups.values():
            loaded = ((i, requests[i], self._visuals(requests[i])) for i in indices)
            # visuals are loaded one window at a time, sorted by size within it, cut into batches
            for batch in sorted_batches(loaded, self.batch_size, key=lambda item: visual_size(item[2])):
                chosen = [item for _, item in batch]
                texts = self.answer_batch([(req.args[0], visuals) for _, req, visuals in chosen],
                                          chosen[0][1].args[1], [self._where(req) for _, req, _ in chosen])
                for (i, req, _), text in zip(chosen, texts, strict=True):
                    self.cache_hook.add_partial("generate_until", (req.args[0], req.args[1]), text)
                    answers[i] = text
                bar.update(len(chosen))
        bar.close()
        self._log_summary()
        return answers

    @staticmethod
    def _where(req: Instance) -> tuple[str, str, Any]:
        _, _, _, doc_id, task, split = req.args
        return task, split, doc_id

    def _visuals(self, req: Instance) -> Any:
        _, _, doc_to_visual, doc_id, task, split = req.args
        return doc_to_visual(self.task_dict[task][split][doc_id])

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Each round is a fresh prompt that the task's ``doc_to_text`` builds from the earlier answers."""
        results = []
        for req in tqdm(requests, desc=MODEL_NAME, disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            visuals = doc_to_visual(doc)
            outputs: list[str] = []
            info = None
            round_idx = 0
            while True:
                outputs.append(self.answer(context, visuals, gen_kwargs, where=(task, split, doc_id)))
                round_idx += 1
                visuals, context, done, updated, info = doc_to_text(
                    doc, previous_output=list(outputs), round_idx=round_idx, previous_round_info=info
                )
                if updated is not None:
                    outputs = list(updated)
                if done:
                    break
            self.cache_hook.add_partial("generate_until_multi_round", (req.args[0], gen_kwargs), outputs)
            results.append(outputs)
        self._log_summary()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its context (and whether greedy decoding would
        produce it), under the pruning method: the context is the prompt that is pruned, as in
        generation, and the continuation follows token by token on the pruned KV cache."""
        results = []
        for req in tqdm(requests, desc=MODEL_NAME, disable=self.rank != 0):
            if len(req.args) == 2:  # unconditional requests (acc_mutual_info) carry no document
                (context, continuation), visuals, where = req.args, None, None
            else:
                context, continuation, doc_to_visual, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                if callable(continuation):  # output_type loglikelihood passes doc_to_target
                    continuation = continuation(doc)
                visuals, where = doc_to_visual(doc), (task, split, doc_id)
            result = self.continuation_logprob(context, visuals, str(continuation), where=where)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
            results.append(result)
        self._log_summary()
        return results

    # -- prompts ---------------------------------------------------------------------------------------
    def request(self, context: str, visuals: Any) -> Request:
        """One user turn: the visuals first, then the text (after the system turn, if any)."""
        images, videos = split_visuals(visuals)
        prompt = context.replace("<image>", "")  # the visuals are placed by the chat template
        return Request(images, prompt, videos=videos, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                       max_tiles=self.max_tiles, system_prompt=self.system_prompt)

    def prepare(self, context: str, visuals: Any) -> dict[str, torch.Tensor]:
        """Model inputs for one request (batch of one)."""
        config = self._model.config
        inputs, _ = build_inputs(self.processor, self.request(context, visuals).messages(),
                                 image_patch_size=config.vision_config.patch_size, model_type=config.model_type,
                                 max_tiles=self.max_tiles)
        return inputs.to(self._device)

    def answer_batch(self, prompts: Sequence[tuple[str, Any]], gen_kwargs: dict[str, Any] | None = None,
                     where: Sequence[tuple[str, str, Any] | None] | None = None) -> list[str]:
        """Answers to ``(context, visuals)`` prompts generated together (one set of generation kwargs),
        each cut at the stop strings; records a report per prompt."""
        kwargs, stops = generation_settings(gen_kwargs, self.max_new_tokens)
        if self.method is not None and kwargs.get("num_beams", 1) > 1:
            raise ValueError(f"{MODEL_NAME} prunes one sequence at a time: num_beams must be 1 with pruning")
        rows: list[Generation] = generate_batch(
            self._model, self.processor, [self.request(c, v) for c, v in prompts], self.method, clock=False,
            decode_kwargs={"skip_special_tokens": True, "clean_up_tokenization_spaces": False}, **kwargs)
        where = where or [None] * len(rows)
        for row, place in zip(rows, where, strict=True):
            self._record(row.prompt_ids, place, row.report)
        return [cut_at_stops(row.text, stops) for row in rows]

    def answer(
        self,
        context: str,
        visuals: Any,
        gen_kwargs: dict[str, Any] | None = None,
        where: tuple[str, str, Any] | None = None,
    ) -> str:
        """Generate under the pruning method, decode, cut at the stop strings; records a report."""
        return self.answer_batch([(context, visuals)], gen_kwargs, [where])[0]

    @torch.inference_mode()
    def continuation_logprob(
        self, context: str, visuals: Any, continuation: str, where: tuple[str, str, Any] | None = None
    ) -> tuple[float, bool]:
        """``(log p(continuation | prompt), is_greedy)``; the continuation's tokens follow the assistant
        turn's opening, one decode step each (a pruned KV cache takes one token at a time)."""
        inputs = self.prepare(context, visuals)
        ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        applied = contextlib.nullcontext()
        if self.method is not None:
            self.method.last_report = None
            applied = self.method(self._model)
        with applied:
            out = self._model(**inputs, use_cache=True, logits_to_keep=1)
            total, greedy = 0.0, True
            for i, token in enumerate(ids):
                logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                total += float(logprobs[token])
                greedy = greedy and int(logprobs.argmax()) == token
                if i + 1 < len(ids):
                    step = torch.tensor([[token]], device=self._device)
                    out = self._model(input_ids=step, past_key_values=out.past_key_values, use_cache=True)
        self._record(inputs["input_ids"][0], where, self.method.last_report if self.method is not None else None)
        return total, greedy

    def _record(self, input_ids: torch.Tensor, where: tuple[str, str, Any] | None, report) -> None:
        cfg = self._model.config
        media_ids = [i for i in (cfg.image_token_id, getattr(cfg, "video_token_id", None)) if i is not None]
        visual = int(torch.isin(input_ids, torch.tensor(media_ids, device=input_ids.device)).sum())
        kept = report.visual_kept if report is not None and report.spans else visual
        task, split, doc_id = where if where is not None else (None, None, None)
        entry = {
            "task": task,
            "split": split,
            "doc_id": doc_id,
            "method": self.method_config["method"],
            "layer": self.method_config.get("layer"),
            "budget": self.method_config.get("budget"),
            "seq_len": int(input_ids.numel()),
            "visual_tokens": visual,
            "visual_kept": int(kept),
            "kept_visual_ratio": kept / visual if visual else 1.0,
            "reason": report.reason if report is not None else None,
        }
        self.reports.append(entry)
        if self.prune_log is not None:
            with open(self.prune_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, default=str) + "\n")

    def _log_summary(self) -> None:
        mean = self.mean_kept_visual_ratio
        if mean is not None:
            logger.info(f"{MODEL_NAME}: {len(self.reports)} requests, mean kept visual ratio {mean:.3f}")


__all__ = [
    "IVCPruneLMM",
    "MODEL_NAME",
    "build_method",
    "cut_at_stops",
    "generation_settings",
    "parse_batch_size",
    "split_visuals",
    "visual_size",
]
