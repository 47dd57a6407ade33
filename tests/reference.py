"""Independent references the tests compare against.

``masked_reference``: the *unpruned* model where pruned prompt tokens are only masked out as keys —
from layer K on during prefill, at every layer while decoding. Nothing is cut, no position changes.
Pruned-and-cut must give the same logits for the kept tokens and the same decode steps.

``reference_selection``: the selection rules of METHOD.md written again with Python loops and
float64 math, from the unpruned model's hidden states.
"""

from __future__ import annotations

import contextlib
import math

import torch


@contextlib.contextmanager
def masked_reference(model, keep: torch.Tensor, layer: int):
    """Within the block, ``model`` masks prompt positions not in ``keep`` (sorted prompt positions) as keys
    from decoder layer ``layer`` on (prefill) and at every layer for later tokens (decode)."""
    with masked_stages(model, [(layer, keep)]):
        yield


@contextlib.contextmanager
def masked_stages(model, stages):
    """Multi-stage :func:`masked_reference`: ``stages`` are ``(layer, keep)`` in layer order; during prefill,
    layer ``l`` sees as keys the prompt positions kept by the last stage at or before ``l`` (all before the
    first); later tokens see, at every layer, the positions kept by the last stage.

    Where the model hands a layer a 4-D mask of its own (a batch of one), the pruned keys are masked on top of
    it, so whatever else it encodes (Gemma 3's bidirectional image blocks and sliding windows, in original
    positions) stays; otherwise the mask is plain causal."""
    lm = model.model.language_model
    prompt_len = None

    def alive_at(idx):
        keep = None
        for stage_layer, stage_keep in stages:
            if stage_layer <= idx:
                keep = stage_keep
        return keep

    def pre(idx):
        def hook(module, args, kwargs):
            nonlocal prompt_len
            hidden = args[0] if args else kwargs["hidden_states"]
            q = hidden.shape[1]
            cache = kwargs.get("past_key_values")
            past = cache.layers[idx].get_seq_length() if cache is not None and len(cache.layers) > idx else 0
            kv = past + q
            if past == 0:
                prompt_len = q
            device = hidden.device  # masks live with the hidden states (CPU, CUDA), in their dtype
            key_ok = torch.ones(kv, dtype=torch.bool, device=device)
            keep = alive_at(idx) if past == 0 else stages[-1][1]
            if keep is not None:
                prompt_keep = torch.zeros(prompt_len, dtype=torch.bool, device=device)
                prompt_keep[torch.as_tensor(keep, device=device)] = True
                key_ok[:prompt_len] = prompt_keep
            own = kwargs.get("attention_mask")
            if isinstance(own, torch.Tensor) and own.dim() == 4 and own.shape[0] == 1:
                # the model's own mask of this layer (bidirectional image blocks, sliding windows: Gemma 3) over
                # the keys its cache hands the layer (a sliding cache: the last ones), pruned keys masked too;
                # a query whose every key is masked keeps itself (finite, never read by a kept token)
                seen = own.shape[-1]
                allowed = (own[0, 0] if own.dtype == torch.bool else own[0, 0] == 0) & key_ok[kv - seen:][None, :]
                allowed[torch.arange(q), torch.arange(seen - q, seen)] |= ~allowed.any(-1)
                mask = torch.zeros(1, 1, q, seen, dtype=hidden.dtype, device=device)
                kwargs["attention_mask"] = mask.masked_fill_(~allowed[None, None], torch.finfo(hidden.dtype).min)
                return args, kwargs
            rows = torch.arange(past, past + q, device=device)[:, None]
            cols = torch.arange(kv, device=device)[None, :]
            allowed = (cols <= rows) & key_ok[None, :]
            dtype = hidden.dtype
            mask = torch.zeros(1, 1, q, kv, dtype=dtype, device=device)
            mask.masked_fill_(~allowed[None, None], torch.finfo(dtype).min)
            kwargs["attention_mask"] = mask
            return args, kwargs

        return hook

    handles = [layer_mod.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer_mod in enumerate(lm.layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _rank(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def _round_half_even(x: float) -> int:
    return int(round(x))


def reference_selection(model, inputs, layer, budget=0.5, ivc_ratio=0.1, seed_ratio=0.01, rule="fill",
                        fg_ratio=0.4, query_offset=2, softmax_domain="span", min_one_seed=True, value_input="normed",
                        scored_part=None):
    """Per span: dict(ivc_cos=set, ivc_sin=set, seed=set, kept=set) of prompt positions.

    ``softmax_domain``: the similarity softmax runs over the span's tokens (``"span"``) or over every
    token of the prompt, then only the span's columns are kept (``"sequence"``). ``min_one_seed``: at
    least one seed (``max(1, round(seed_ratio * L))``), else ``round(seed_ratio * L)``, possibly 0.
    ``value_input``: values from layer K-1's input-normed hidden states (``"normed"``) or from the raw
    residual stream entering it (``"residual"``). 1-D RoPE models (no ``get_rope_index``) use positions
    ``0..S-1``. ``scored_part(start, L) -> (first, n)``: seeds and foreground scores come from that part of
    the span only (InternVL's thumbnail); the result then also holds ``cos``, ``sin``, ``fg_scores`` and
    ``seed`` local to the part, and the caller applies the budget rule."""
    if softmax_domain not in ("span", "sequence"):
        raise ValueError(f"softmax_domain must be 'span' or 'sequence', got {softmax_domain!r}")
    cfg = model.config
    text = cfg.get_text_config()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        if hasattr(model.model, "get_rope_index"):
            pos, _ = model.model.get_rope_index(
                inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
                video_grid_thw=inputs.get("video_grid_thw"),
            )
        else:
            pos = torch.arange(inputs["input_ids"].shape[1])[None, None]
        dec = model.model.language_model.layers[layer - 1]
        hidden = out.hidden_states[layer - 1]
        v = dec.self_attn.v_proj(hidden if value_input == "residual" else dec.input_layernorm(hidden))[0]
    head_dim = text.hidden_size // text.num_attention_heads
    H = text.num_key_value_heads
    v = v.double().view(v.shape[0], H, head_dim)
    theta_base = text.rope_parameters["rope_theta"]
    thetas = [theta_base ** (-(2 * j) / head_dim) for j in range(head_dim // 2)]
    ids = inputs["input_ids"][0].tolist()
    visual = [t in (cfg.image_token_id, getattr(cfg, "video_token_id", None)) for t in ids]
    axes = pos.shape[0]
    spans, i = [], 0
    while i < len(ids):
        if visual[i]:
            j = i
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            spans.append((i, j - i))
            i = j
        else:
            i += 1
    results = []
    for s, L in spans:
        pts = [[int(pos[a, 0, s + k]) for a in range(axes)] for k in range(L)]

        def axis_mean(fn, p):
            return math.fsum(math.fsum(fn(p[a] * th) for th in thetas) / len(thetas) for a in range(axes)) / axes

        cos_s = [axis_mean(math.cos, p) for p in pts]
        sin_s = [axis_mean(math.sin, p) for p in pts]
        n_ivc = _round_half_even(ivc_ratio * L)
        ivc_cos = _rank(cos_s)[:n_ivc]
        ivc_sin = _rank(sin_s)[:n_ivc]
        queries = [q for q in range(s + L + query_offset, len(ids)) if not visual[q]]
        part, n = scored_part(s, L) if scored_part else (0, L)  # scored columns: span tokens part..part+n-1

        # the softmax runs over these prompt positions; the row keeps the scored columns only
        domain = range(s + part, s + part + n) if softmax_domain == "span" else range(len(ids))
        first = domain.index(s + part)

        def row(qvec, domain=domain, first=first, n=n):
            out_row = [0.0] * n
            for h in range(H):
                logits = [float(qvec[h] @ v[t, h]) / math.sqrt(head_dim) for t in domain]
                m = max(logits)
                ex = [math.exp(x - m) for x in logits]
                z = math.fsum(ex)
                for k in range(n):
                    out_row[k] += ex[first + k] / z / H
            return out_row

        text_rows = [row(v[q]) for q in queries]
        stage1 = [math.fsum(r[k] for r in text_rows) / len(text_rows) for k in range(n)]
        n_seed = _round_half_even(seed_ratio * n)
        if min_one_seed:
            n_seed = max(1, n_seed)
        seeds = _rank(stage1)[:n_seed]
        rows = text_rows + [row(v[s + part + k]) for k in seeds]
        fg = [math.fsum(r[k] for r in rows) / len(rows) for k in range(n)]
        if scored_part:
            results.append(dict(start=s, length=L, cos=cos_s, sin=sin_s, fg_scores=fg, seed=seeds))
            continue
        priority = set(ivc_cos) | set(ivc_sin) | set(seeds)
        if rule == "fill":
            target = max(1, _round_half_even(budget * L))
            kept = set(priority)
            for k in _rank(fg):
                if len(kept) >= target:
                    break
                kept.add(k)
        else:
            kept = priority | set(_rank(fg)[: _round_half_even(fg_ratio * L)])
        results.append(
            dict(
                start=s,
                length=L,
                ivc_cos={s + k for k in ivc_cos},
                ivc_sin={s + k for k in ivc_sin},
                seed={s + k for k in seeds},
                kept={s + k for k in kept},
                fg_scores=fg,
            )
        )
    return results
