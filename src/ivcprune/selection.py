"""The IVC-Prune method as small pure functions.

Nothing here knows about models: inputs are position ids, RoPE inverse frequencies and value vectors,
outputs are indices local to one visual span (``0 .. L-1``). Every top-k is deterministic: equal scores
are ranked by lower index first, so a selection is reproducible across devices and runs.

Two arithmetics are offered (``NUMERICS``): ``"ours"`` (float64 IVC statistic, float32 similarities) and
``"authors"``, which re-states step by step the released code's model-dtype (bf16) arithmetic, so that its
selections can be reproduced to the token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IVC_STATISTICS = ("authors", "applied")
NUMERICS = ("ours", "authors")
SIMILARITY_DOMAINS = ("span", "sequence")
AUTHORS_MEANS = ("per_row", "joint")


def ratio_count(ratio: float, length: int) -> int:
    """Tokens that ``ratio`` of ``length`` amounts to, rounded the way the reference code rounds
    (Python's ``round``: to nearest, halves to even), never more than ``length``."""
    return min(length, int(round(ratio * length)))


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``scores`` in rank order; ties go to the lower index."""
    k = max(0, min(int(k), scores.numel()))
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]


def _symmetric_axis_mean(per_axis: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0, summed in sorted order so that permuting the axes (h <-> w) gives bitwise
    identical results: M-RoPE scores are symmetric in h and w and those ties must stay exact ties."""
    if per_axis.shape[0] == 1:
        return per_axis[0]
    return torch.sort(per_axis, dim=0).values.sum(dim=0) / per_axis.shape[0]


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _release_mean(x: torch.Tensor, dim: int | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``x.mean(dim)`` of a model-dtype tensor the way the release's CUDA reduction computes it.

    PyTorch's CUDA mean of a bf16/fp16 tensor accumulates in float32, multiplies the sum by the float32
    factor ``1 / n`` and rounds the result once to the tensor's dtype. CUDA's summation order cannot be
    reproduced here, so the float32 accumulator is stood in for by the exact (float64) sum rounded to
    float32; the two differ by a few float32 ulps, far below the final ``dtype`` rounding, and the
    exact sum is independent of the order of the summands (M-RoPE's h <-> w symmetry stays exact).
    """
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    n = 1
    for d in dims:
        n *= x.shape[d]
    total = x.to(torch.float64).sum(dim=dims).to(torch.float32)
    factor = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(n), dtype=torch.float32)
    return (total * factor.to(total.device)).to(dtype)


def _release_ivc(
    pos: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    axis_of_freq: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The IVC statistic in the release's arithmetic (see ``ivc_scores(numerics="authors")``)."""
    theta = inv_freq.detach().to(device=pos.device, dtype=torch.float32).reshape(-1)
    p = pos.to(torch.float32)  # the rotary module casts position ids to float32
    if axis_of_freq is None:
        freqs = p[:, :, None] * theta  # (A, L, F): the module's k=1 matmul is one float32 product
    else:
        freqs = (p[axis_of_freq].T * theta)[None]  # (1, L, F): band j rotated by its own axis
    emb = torch.cat((freqs, freqs), dim=-1)  # the module's cos/sin span the whole head_dim (halves repeated)
    cos = (emb.cos() * attention_scaling).to(dtype)  # scaled in float32, then cast to the model dtype
    sin = (emb.sin() * attention_scaling).to(dtype)
    return _release_mean(cos, (0, 2), dtype), _release_mean(sin, (0, 2), dtype)


def _frequency_axes(n_axes: int, n_freq: int, mrope_section: Sequence[int] | None,
                    axis_of_freq: Sequence[int] | None, device) -> torch.Tensor:
    """``(F,)`` the axis rotating each frequency: ``axis_of_freq`` when given, else contiguous sections."""
    if axis_of_freq is not None:
        axes = torch.as_tensor(list(axis_of_freq), dtype=torch.long, device=device)
        if axes.numel() != n_freq or int(axes.min()) < 0 or int(axes.max()) >= n_axes:
            raise ValueError(f"axis_of_freq must give one of {n_axes} axes to each of {n_freq} frequencies, "
                             f"got {axes.tolist()}")
        return axes
    if mrope_section is None or sum(mrope_section) != n_freq or len(mrope_section) != n_axes:
        raise ValueError(
            f"statistic='applied' needs an mrope_section over {n_axes} axes summing to "
            f"{n_freq} frequencies, got {mrope_section}"
        )
    sizes = torch.tensor(list(mrope_section), device=device)
    return torch.repeat_interleave(torch.arange(n_axes, device=device), sizes)


def ivc_scores(
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    attention_scaling: float = 1.0,
    statistic: str = "authors",
    mrope_section: Sequence[int] | None = None,
    numerics: str = "ours",
    model_dtype: torch.dtype = torch.bfloat16,
    axis_of_freq: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit-visual-coordinate scores of visual tokens, from their rotary positions alone.

    Args:
        positions: ``(A, L)`` rotary position ids of the span's tokens; ``A = 1`` for 1-D RoPE,
            ``A = 3`` (t, h, w) for M-RoPE. A 1-D tensor is read as ``A = 1``.
        inv_freq: ``(F,)`` RoPE inverse frequencies ``theta_j`` (``F = head_dim / 2``).
        attention_scaling: the factor the model multiplies cos/sin with.
        statistic: ``"authors"``: ``mean_a mean_j cos(p_a * theta_j)`` over every axis and every
            frequency (the statistic of the reference implementation). ``"applied"``: the rotation the
            model really applies, where M-RoPE gives frequency band ``j`` to one axis
            (``mrope_section``); identical to ``"authors"`` for 1-D RoPE.
        mrope_section: frequencies per axis (t, h, w) for ``statistic="applied"`` with M-RoPE.
        numerics: ``"ours"``: angles, cos/sin and means in float64. ``"authors"``: the release's
            arithmetic, which reads the statistic off the rotary module's output: float32 angles
            ``float32(p) * float32(theta_j)``, float32 cos/sin over the full head dimension (each
            frequency twice), times ``attention_scaling`` in float32, cast to ``model_dtype``, then one
            mean over axes and head dimensions accumulated in float32 and rounded to ``model_dtype``.
            The scores then take a few dozen distinct values, and ties are common.
        model_dtype: the model's dtype, used by ``numerics="authors"`` only (bf16 for Qwen-VL).
        axis_of_freq: ``(F,)`` the axis (``0 .. A-1``) rotating each frequency, for ``statistic="applied"``
            with M-RoPE layouts other than contiguous sections (Qwen3-VL's interleaved one); ``None``: the
            contiguous sections of ``mrope_section``.

    Returns:
        ``(cos_score, sin_score)``, each ``(L,)`` float64: how close each token's rotation is to the
        identity and to a 90 degree rotation (with ``numerics="authors"``, the ``model_dtype`` values,
        exactly converted).
    """
    _check_choice("ivc statistic", statistic, IVC_STATISTICS)
    _check_choice("numerics", numerics, NUMERICS)
    pos = positions.reshape(1, -1) if positions.dim() == 1 else positions
    freq_axes = None
    if statistic == "applied" and pos.shape[0] > 1:
        freq_axes = _frequency_axes(pos.shape[0], inv_freq.numel(), mrope_section, axis_of_freq, pos.device)
    if numerics == "authors":
        if not model_dtype.is_floating_point:
            raise ValueError(f"model_dtype must be a floating dtype, got {model_dtype}")
        cos_a, sin_a = _release_ivc(pos, inv_freq, attention_scaling, freq_axes, model_dtype)
        return cos_a.to(torch.float64), sin_a.to(torch.float64)
    pos = pos.to(torch.float64)
    theta = inv_freq.detach().to(device=pos.device, dtype=torch.float64).reshape(-1)
    if freq_axes is not None:
        angles = pos[freq_axes].T * theta  # (L, F): frequency j rotated by its own axis
        cos_s, sin_s = angles.cos().mean(dim=1), angles.sin().mean(dim=1)
    else:
        angles = pos[:, :, None] * theta  # (A, L, F)
        cos_s = _symmetric_axis_mean(angles.cos().mean(dim=2))
        sin_s = _symmetric_axis_mean(angles.sin().mean(dim=2))
    return cos_s * attention_scaling, sin_s * attention_scaling


def _release_probs(queries: torch.Tensor, keys: torch.Tensor, divisor: float) -> torch.Tensor:
    """Per-head softmax similarities ``(H, Q, K)`` in the release's arithmetic, in the keys' dtype.

    The release multiplies value vectors in the model dtype (a GEMM with float32 accumulation whose
    output is rounded to that dtype), divides by ``sqrt(head_dim)`` (CUDA does it as a float32 product
    with the float32 reciprocal, rounded again), takes the softmax in float32 and casts it back.
    """
    dtype = keys.dtype
    dot = torch.einsum("hqd,hkd->hqk", queries.to(torch.float64), keys.to(torch.float64))
    logits = dot.to(torch.float32).to(dtype)
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(divisor, dtype=torch.float32)
    logits = (logits.to(torch.float32) * inv.to(logits.device)).to(dtype)
    return torch.softmax(logits.to(torch.float32), dim=-1).to(dtype)


def _span_columns(span: tuple[int, int] | None, n_keys: int) -> slice:
    if span is None:
        return slice(0, n_keys)
    start, length = int(span[0]), int(span[1])
    if start < 0 or length < 0 or start + length > n_keys:
        raise ValueError(f"span (start={start}, length={length}) does not fit in {n_keys} keys")
    return slice(start, start + length)


def similarity_rows(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scale: float | None = None,
    *,
    span: tuple[int, int] | None = None,
    numerics: str = "ours",
) -> torch.Tensor:
    """Softmax similarity of value vectors, averaged over heads.

    Args:
        queries: ``(H, Q, d)`` value vectors of the query tokens, per KV head.
        keys: ``(H, K, d)`` value vectors the softmax runs over, per KV head: the visual tokens only, or
            the whole sequence (then give ``span``).
        scale: logit scale, ``1 / sqrt(d)`` by default.
        span: ``(start, length)``: return only the columns ``start .. start+length-1`` of the rows
            (softmax over all ``K`` keys, then sliced: the "sequence" domain). ``None``: all columns.
        numerics: ``"ours"``: float32 throughout. ``"authors"``: the release's arithmetic in the
            values' dtype (logits and probabilities rounded to that dtype, the head mean accumulated in
            float32 and rounded to it); the result is in the values' dtype.

    Returns:
        ``(Q, length)`` (``(Q, K)`` without ``span``): ``mean_h softmax_k(v_q,h . v_k,h * scale)``.
    """
    _check_choice("numerics", numerics, NUMERICS)
    cols = _span_columns(span, keys.shape[1])
    if numerics == "authors":
        divisor = keys.shape[-1] ** 0.5 if scale is None else 1.0 / scale
        return _release_mean(_release_probs(queries, keys, divisor)[..., cols], 0, keys.dtype)
    if scale is None:
        scale = keys.shape[-1] ** -0.5
    logits = torch.einsum("hqd,hld->hql", queries.float(), keys.float()) * scale
    probs = torch.softmax(logits, dim=-1)
    if span is not None:
        probs = probs[..., cols]
    return probs.mean(dim=0)


def foreground_scores(
    visual_values: torch.Tensor,
    query_values: torch.Tensor,
    num_seeds: int,
    scale: float | None = None,
    *,
    sequence_values: torch.Tensor | None = None,
    span_start: int | None = None,
    numerics: str = "ours",
    authors_mean: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt-aware foreground scores in two stages.

    Stage 1 (semantic seeds): average the text queries' similarity rows; the ``num_seeds`` best
    visual tokens are the seeds. Stage 2 (contextual refinement): the seeds' own similarity rows are
    added, and each token's score is the mean over all rows, text and seed rows alike. With no seeds,
    stage 2 has the text rows only and the scores are the stage-1 scores.

    Args:
        visual_values: ``(H, L, d)`` value vectors of the span's tokens.
        query_values: ``(H, Q, d)`` value vectors of the text queries (``Q >= 1``).
        num_seeds: seeds to pick, clamped to ``[0, L]`` (callers wanting at least one pass ``max(1, n)``).
        scale: logit scale, ``1 / sqrt(d)`` by default.
        sequence_values: ``(H, S, d)`` value vectors of the whole sequence: the similarity softmax then
            runs over all ``S`` tokens (no causal mask) and is sliced to the span's columns, for text and
            seed rows alike (the "sequence" domain). ``None`` (default): softmax over the span's ``L``
            tokens (the "span" domain).
        span_start: where the span starts in ``sequence_values`` (required with it);
            ``visual_values`` must be ``sequence_values[:, span_start:span_start + L]``.
        numerics: ``"ours"`` (float32) or ``"authors"`` (the release's arithmetic in the values' dtype:
            see ``similarity_rows``; every mean is accumulated in float32 and rounded to that dtype).
        authors_mean: how ``numerics="authors"`` averages: ``"per_row"`` rounds each row's head mean,
            then averages the rows (Qwen2.5-VL, LLaVA, InternVL releases); ``"joint"`` takes one mean
            over heads and rows together (Qwen2-VL release). ``None``: ``"joint"`` in the sequence
            domain, ``"per_row"`` in the span domain (the Qwen releases). Equal in exact arithmetic.

    Returns:
        ``(scores, seeds)``: ``(L,)`` float32 foreground scores and the seeds' local indices in rank order.
    """
    _check_choice("numerics", numerics, NUMERICS)
    if authors_mean is not None:
        _check_choice("authors_mean", authors_mean, AUTHORS_MEANS)
    if query_values.shape[1] == 0:
        raise ValueError("foreground scores need at least one text query")
    H, L, d = visual_values.shape
    if sequence_values is None:
        if span_start is not None:
            raise ValueError("span_start is only meaningful with sequence_values")
        keys, span, span_values = visual_values, None, visual_values
    else:
        if span_start is None:
            raise ValueError("sequence_values needs span_start")
        if sequence_values.dim() != 3 or sequence_values.shape[0] != H or sequence_values.shape[2] != d:
            raise ValueError(
                f"sequence_values must be (H={H}, S, d={d}) like visual_values, got {tuple(sequence_values.shape)}"
            )
        cols = _span_columns((span_start, L), sequence_values.shape[1])
        keys, span, span_values = sequence_values, (int(span_start), L), sequence_values[:, cols]
    n_seeds = max(0, min(int(num_seeds), L))

    if numerics == "ours":
        text_rows = similarity_rows(query_values, keys, scale, span=span)
        seeds = stable_topk(text_rows.mean(dim=0), n_seeds)
        seed_rows = similarity_rows(span_values[:, seeds], keys, scale, span=span)
        scores = torch.cat([text_rows, seed_rows], dim=0).mean(dim=0)
        return scores, seeds

    dtype = keys.dtype
    if query_values.dtype != dtype:
        raise ValueError(
            f"numerics='authors' computes in the values' dtype: query values are {query_values.dtype}, "
            f"the other values {dtype}"
        )
    mean = authors_mean or ("per_row" if sequence_values is None else "joint")
    if mean == "per_row":
        text_rows = similarity_rows(query_values, keys, scale, span=span, numerics="authors")
        seeds = stable_topk(_release_mean(text_rows, 0, dtype).float(), n_seeds)
        seed_rows = similarity_rows(span_values[:, seeds], keys, scale, span=span, numerics="authors")
        scores = _release_mean(torch.cat([text_rows, seed_rows], dim=0), 0, dtype)
    else:
        divisor = d**0.5 if scale is None else 1.0 / scale
        cols = _span_columns(span, keys.shape[1])
        text_probs = _release_probs(query_values, keys, divisor)[..., cols]
        seeds = stable_topk(_release_mean(text_probs, (0, 1), dtype).float(), n_seeds)
        seed_probs = _release_probs(span_values[:, seeds], keys, divisor)[..., cols]
        scores = _release_mean(torch.cat([seed_probs, text_probs], dim=1), (0, 1), dtype)
    return scores.float(), seeds


def _index_set(length: int, device: torch.device, *groups: torch.Tensor) -> torch.Tensor:
    taken = torch.zeros(length, dtype=torch.bool, device=device)
    for g in groups:
        taken[g] = True
    return taken


def fill_to_budget(
    length: int, priority: Sequence[torch.Tensor], fill_scores: torch.Tensor, target: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Budget rule: keep the priority tokens, then the best-scored others until ``target`` tokens.

    The priority set is never truncated: if it alone exceeds ``target``, it is kept whole (as the
    reference implementation does).

    Returns:
        ``(kept, fill)``: sorted local indices kept, and the fill tokens in rank order.
    """
    taken = _index_set(length, fill_scores.device, *priority)
    remaining = target - int(taken.sum())
    if remaining > 0:
        order = torch.sort(fill_scores, descending=True, stable=True).indices
        fill = order[~taken[order]][:remaining]
    else:
        fill = fill_scores.new_zeros(0, dtype=torch.long)
    taken[fill] = True
    return taken.nonzero().squeeze(1), fill


def union_rule(
    length: int, priority: Sequence[torch.Tensor], fg_scores: torch.Tensor, fg_count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Union rule: priority tokens plus the top ``fg_count`` foreground tokens, whatever the overlap.

    Returns:
        ``(kept, foreground)``: sorted local indices kept, and the foreground tokens not already in the
        priority set, in rank order.
    """
    taken = _index_set(length, fg_scores.device, *priority)
    top = stable_topk(fg_scores, fg_count)
    fg = top[~taken[top]]
    taken[fg] = True
    return taken.nonzero().squeeze(1), fg


def interleave_rankings(rankings: Sequence[torch.Tensor], target: int) -> list[torch.Tensor]:
    """Take tokens round-robin from several rankings (skipping repeats) until ``target`` distinct ones.

    Returns the tokens contributed by each ranking, in rank order. Used by the "IVC only" ablation,
    which spends the whole budget on the cos and sin rankings alternately.
    """
    picked: list[list[int]] = [[] for _ in rankings]
    seen: set[int] = set()
    lists = [r.tolist() for r in rankings]
    cursors = [0] * len(lists)
    while len(seen) < target and any(c < len(lst) for c, lst in zip(cursors, lists)):
        for i, lst in enumerate(lists):
            while cursors[i] < len(lst) and lst[cursors[i]] in seen:
                cursors[i] += 1
            if cursors[i] < len(lst) and len(seen) < target:
                seen.add(lst[cursors[i]])
                picked[i].append(lst[cursors[i]])
                cursors[i] += 1
    device = rankings[0].device if rankings else None
    return [torch.tensor(p, dtype=torch.long, device=device) for p in picked]
