"""Pieces of the attention- and merge-based baselines (FastV, PDrop, VisionZip) as small pure functions.

Nothing here knows about models: inputs are tensors the runtime captured (a layer's queries and keys, a
vision tower's CLS attention, keys and hidden states), outputs are scores or indices local to one visual
span (``0 .. L-1``). Every top-k and every argmax is deterministic: equal values go to the lower index.

* :func:`last_query_attention` is the text-to-image score of FastV and PDrop, computed from captured
  pre-rotary ``q``/``k`` so that no method has to force eager attention on the model.
* :func:`visionzip_select` is VisionZip's choice of dominant tokens plus its merge of the rest into a few
  contextual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ivcprune.selection import ratio_count, stable_topk

MERGE_RULES = ("release", "mean")
# VisionZip's LLaVA-1.5 settings split a budget of 64 / 128 / 192 tokens as 54+10 / 108+20 / 162+30
VISIONZIP_CONTEXTUAL_SHARE = 10 / 64


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in float32, as transformers rotates queries and keys (``cos`` / ``sin``
    broadcast against ``x``'s last two dims: ``(S, d)`` for ``(..., S, d)``)."""
    f32 = torch.float32
    xf = x.to(f32)
    return xf * cos.to(f32) + _rotate_half(xf) * sin.to(f32)


def _check_rotary(name: str, table: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(table.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(table.shape)}")


def _check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, scaling: float, num_key_value_groups: int
) -> tuple[int, int, int, int]:
    if q.dim() != 2:
        raise ValueError(f"q must be (heads, head_dim) for the one query token, got shape {tuple(q.shape)}")
    if k.dim() != 3:
        raise ValueError(f"k must be (kv_heads, S, head_dim), got shape {tuple(k.shape)}")
    n_heads, head_dim = q.shape
    n_kv, n_keys, k_dim = k.shape
    if k_dim != head_dim:
        raise ValueError(f"q and k head dims differ: {head_dim} vs {k_dim}")
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    if n_keys == 0:
        raise ValueError("k has no keys (S = 0)")
    if isinstance(num_key_value_groups, bool) or int(num_key_value_groups) != num_key_value_groups:
        raise ValueError(f"num_key_value_groups must be an integer, got {num_key_value_groups!r}")
    if num_key_value_groups < 1 or n_kv * num_key_value_groups != n_heads:
        raise ValueError(
            f"{n_heads} query heads do not match {n_kv} kv heads x num_key_value_groups={num_key_value_groups}"
        )
    if not (float(scaling) > 0 and float(scaling) < float("inf")):
        raise ValueError(f"scaling must be a positive finite number, got {scaling!r}")
    return n_heads, head_dim, n_kv, n_keys


def last_query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scaling: float,
    num_key_value_groups: int,
    *,
    query_cos: torch.Tensor | None = None,
    query_sin: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query (the sequence's last token) over ``S`` keys, averaged over heads.

    This is the row an eager attention layer computes for its last token, re-computed from the layer's
    query and keys *before* the rotary embedding, so that it can be taken from any attention
    implementation (sdpa, flash) by capturing ``q``/``k`` only. The rotary embedding is applied the way
    transformers' ``apply_rotary_pos_emb`` applies it (``x * cos + rotate_half(x) * sin``); grouped-query
    attention repeats each kv head over ``num_key_value_groups`` consecutive query heads (``repeat_kv``).
    Everything is computed in float32: the rotation, the logits ``q . k * scaling`` and the softmax.

    Args:
        q: ``(H, head_dim)`` the query token's states per head, as the layer hands them to the rotary
            embedding (after ``q_proj``, and after ``q_norm`` in models that have one).
        k: ``(H_kv, S, head_dim)`` the keys of the same layer, also before the rotary embedding.
        cos, sin: ``(S, head_dim)`` the keys' rotary tables, one batch row of the layer's
            ``position_embeddings`` (for M-RoPE, the tables after the section recomposition, which is
            what the layer multiplies with).
        scaling: the layer's logit scale (``module.scaling``, usually ``head_dim ** -0.5``).
        num_key_value_groups: ``H / H_kv``.
        query_cos, query_sin: ``(head_dim,)`` the query's rotary tables; by default ``cos[-1]`` and
            ``sin[-1]``, because the query is the last of the ``S`` tokens.
        key_mask: ``(S,)`` bool, False on keys the query may not see (padding, outside a sliding window);
            those get probability 0. ``None``: every key is visible (the last token sees all earlier ones
            under a causal mask).

    Returns:
        ``(S,)`` float32: ``mean_h softmax_s(q_h . k_{h // groups, s} * scaling)``.
    """
    n_heads, head_dim, n_kv, n_keys = _check_attention_inputs(q, k, scaling, num_key_value_groups)
    _check_rotary("cos", cos, (n_keys, head_dim))
    _check_rotary("sin", sin, (n_keys, head_dim))
    query_cos = cos[-1] if query_cos is None else query_cos
    query_sin = sin[-1] if query_sin is None else query_sin
    _check_rotary("query_cos", query_cos, (head_dim,))
    _check_rotary("query_sin", query_sin, (head_dim,))
    if key_mask is not None:
        if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (n_keys,):
            raise ValueError(f"key_mask must be a bool tensor of shape ({n_keys},), got {key_mask.dtype} "
                             f"{tuple(key_mask.shape)}")
        if not bool(key_mask.any()):
            raise ValueError("key_mask hides every key: the softmax would have nothing to attend to")

    f32 = torch.float32
    qf = q.to(f32)
    kf = k.to(f32)
    q_rot = qf * query_cos.to(f32) + _rotate_half(qf) * query_sin.to(f32)
    k_rot = kf * cos.to(f32) + _rotate_half(kf) * sin.to(f32)
    # query head h reads kv head h // groups: group the query heads instead of repeating the keys
    q_grouped = q_rot.reshape(n_kv, n_heads // n_kv, head_dim)
    logits = torch.einsum("kgd,ksd->kgs", q_grouped, k_rot).reshape(n_heads, n_keys) * float(scaling)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask.to(logits.device), float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=0)


@dataclass(frozen=True)
class VisionZipSelection:
    """What :func:`visionzip_select` keeps of one span of ``L`` visual tokens.

    Attributes:
        dominant: ``(dominant,)`` span-local indices of the dominant tokens, in rank order (highest CLS
            attention first, ties to the lower index). They are kept with their own features.
        targets: ``(contextual,)`` span-local indices of the contextual tokens' targets, ascending.
            Contextual token ``j`` replaces token ``targets[j]`` *in place*: the library keeps every kept
            token's original position id, so a merged token sits at its target's position (VisionZip's
            release instead appends the contextual tokens after the dominant ones, with fresh positions).
        merged: ``(contextual, D)`` the contextual tokens' features, in the dtype of the input features.
        assignment: ``(L,)`` long: ``j`` for the target of contextual token ``j`` and for every token merged
            into it; ``-1`` for tokens in no group (the dominant tokens, and every non-dominant token when
            ``contextual`` is 0, which are then dropped).
    """

    dominant: torch.Tensor
    targets: torch.Tensor
    merged: torch.Tensor
    assignment: torch.Tensor

    @property
    def kept(self) -> torch.Tensor:
        """Span-local indices of every token that stays in the sequence (dominant and targets), sorted."""
        return torch.sort(torch.cat([self.dominant, self.targets])).values


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _visionzip_inputs(
    cls_attention: torch.Tensor, keys: torch.Tensor, features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-reduced CLS scores ``(L,)`` and key metric ``(L, d)`` in float32, after checking shapes."""
    if features.dim() != 2:
        raise ValueError(f"features must be (L, D), got shape {tuple(features.shape)}")
    length = features.shape[0]
    if cls_attention.dim() not in (1, 2) or cls_attention.shape[-1] != length:
        raise ValueError(f"cls_attention must be (L,) or (heads, L) with L={length}, got {tuple(cls_attention.shape)}")
    if keys.dim() not in (2, 3) or keys.shape[-2] != length:
        raise ValueError(f"keys must be (L, d) or (heads, L, d) with L={length}, got {tuple(keys.shape)}")
    scores = cls_attention.to(torch.float32)
    metric = keys.to(torch.float32)
    if scores.dim() == 2:
        scores = scores.sum(dim=0)  # the release sums the CLS row over heads
    if metric.dim() == 3:
        metric = metric.mean(dim=0)  # and compares keys averaged over heads
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("cls_attention has non-finite values")
    if not bool(torch.isfinite(metric).all()):
        raise ValueError("keys have non-finite values")
    return scores, metric


def visionzip_select(
    cls_attention: torch.Tensor,
    keys: torch.Tensor,
    features: torch.Tensor,
    dominant: int,
    contextual: int,
    *,
    merge: str = "release",
) -> VisionZipSelection:
    """VisionZip on one span: keep the ``dominant`` tokens the CLS token attends to most, merge the rest
    into ``contextual`` tokens.

    Dominant tokens: the top ``dominant`` by CLS attention (summed over heads when given per head).
    Contextual tokens: of the ``R = L - dominant`` remaining tokens, taken in index order, every
    ``step``-th one from the first is a target (``step = max(1, R // contextual)``, the first
    ``contextual`` of them), so targets are evenly spaced over the remaining tokens. Every other remaining
    token joins the target whose key is most similar (cosine similarity of the keys averaged over heads;
    ties to the lower target). The contextual token's features are then built by ``merge``:

    * ``"release"``: the target's features **plus the mean** of its joined tokens' features (just the
      target's when none joined), which is what VisionZip's released code computes;
    * ``"mean"``: the mean over the target and its joined tokens together.

    The release keeps the CLS token as one of its dominant tokens (``dominant=54`` is the CLS token and 53
    patches); spans here hold patch tokens only, so ``dominant`` counts patches. Keys with zero norm have
    similarity 0 to every target. Similarities are float32; merging accumulates in float32 (float64 for
    float64 features).

    Args:
        cls_attention: ``(L,)`` or ``(heads, L)``: the CLS query's attention over the span's tokens, from
            the vision layer whose hidden states are the features (VisionZip: the ``-2`` layer).
        keys: ``(L, d)`` or ``(heads, L, d)``: that layer's keys of the span's tokens.
        features: ``(L, D)``: the hidden states to merge (those that go on to the projector).
        dominant: dominant tokens to keep (``>= 0``).
        contextual: contextual tokens to form (``>= 0``); ``dominant + contextual`` must be in ``1 .. L``.
        merge: ``"release"`` or ``"mean"`` (see above).

    Returns:
        A :class:`VisionZipSelection`.
    """
    if merge not in MERGE_RULES:
        raise ValueError(f"merge must be one of {MERGE_RULES}, got {merge!r}")
    dominant, contextual = _check_count("dominant", dominant), _check_count("contextual", contextual)
    scores, metric = _visionzip_inputs(cls_attention, keys, features)
    length, device = features.shape[0], features.device
    if not 1 <= dominant + contextual <= length:
        raise ValueError(f"dominant + contextual must be between 1 and the span's {length} tokens, "
                         f"got {dominant} + {contextual}")

    dom = stable_topk(scores, dominant).to(device)
    assignment = torch.full((length,), -1, dtype=torch.long, device=device)
    if contextual == 0:
        return VisionZipSelection(dom, dom.new_zeros(0), features.new_zeros(0, features.shape[1]), assignment)
    is_dominant = torch.zeros(length, dtype=torch.bool, device=device)
    is_dominant[dom] = True
    remaining = (~is_dominant).nonzero().squeeze(1)
    step = max(1, remaining.numel() // contextual)
    picks = torch.arange(0, remaining.numel(), step, device=device)[:contextual]
    targets = remaining[picks]
    is_target = torch.zeros(remaining.numel(), dtype=torch.bool, device=device)
    is_target[picks] = True
    others = remaining[~is_target]

    unit = torch.nn.functional.normalize(metric.to(device), dim=-1)
    group = (unit[others] @ unit[targets].T).argmax(dim=1)  # argmax returns the first maximum
    assignment[targets] = torch.arange(contextual, device=device)
    assignment[others] = group

    acc = torch.promote_types(features.dtype, torch.float32)
    member = torch.nn.functional.one_hot(group, contextual).to(acc)  # (n_others, contextual)
    sums = member.T @ features[others].to(acc)  # a matmul, not index_add: no atomics, reproducible
    counts = member.sum(dim=0).unsqueeze(1)
    base = features[targets].to(acc)
    merged = base + sums / counts.clamp(min=1) if merge == "release" else (base + sums) / (counts + 1)
    return VisionZipSelection(dom, targets, merged.to(features.dtype), assignment)


def visionzip_counts(budget: int, contextual_share: float = VISIONZIP_CONTEXTUAL_SHARE) -> tuple[int, int]:
    """``(dominant, contextual)`` for a budget of kept tokens, split as VisionZip's settings split it.

    ``contextual = round(contextual_share * budget)`` (Python rounding), ``dominant`` the rest; the default
    share reproduces 54+10, 108+20 and 162+30 for 64, 128 and 192 tokens.
    """
    budget = _check_count("budget", budget)
    if not 0.0 <= contextual_share <= 1.0:
        raise ValueError(f"contextual_share must be in [0, 1], got {contextual_share!r}")
    contextual = ratio_count(contextual_share, budget)
    return budget - contextual, contextual
