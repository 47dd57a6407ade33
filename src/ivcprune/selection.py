"""The IVC-Prune method as small pure functions.

Nothing here knows about models: inputs are position ids, RoPE inverse frequencies and value vectors,
outputs are indices local to one visual span (``0 .. L-1``). Every top-k is deterministic: equal scores
are ranked by lower index first, so a selection is reproducible across devices and runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IVC_STATISTICS = ("authors", "applied")


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


def ivc_scores(
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    attention_scaling: float = 1.0,
    statistic: str = "authors",
    mrope_section: Sequence[int] | None = None,
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

    Returns:
        ``(cos_score, sin_score)``, each ``(L,)`` float64: how close each token's rotation is to the
        identity and to a 90 degree rotation.
    """
    if statistic not in IVC_STATISTICS:
        raise ValueError(f"ivc statistic must be one of {IVC_STATISTICS}, got {statistic!r}")
    pos = positions.reshape(1, -1) if positions.dim() == 1 else positions
    pos = pos.to(torch.float64)
    theta = inv_freq.detach().to(device=pos.device, dtype=torch.float64).reshape(-1)
    if statistic == "applied" and pos.shape[0] > 1:
        if mrope_section is None or sum(mrope_section) != theta.numel() or len(mrope_section) != pos.shape[0]:
            raise ValueError(
                f"statistic='applied' needs an mrope_section over {pos.shape[0]} axes summing to "
                f"{theta.numel()} frequencies, got {mrope_section}"
            )
        axis_of_freq = torch.repeat_interleave(
            torch.arange(len(mrope_section), device=pos.device), torch.tensor(list(mrope_section), device=pos.device)
        )
        angles = pos[axis_of_freq].T * theta  # (L, F): frequency j rotated by its own axis
        cos_s, sin_s = angles.cos().mean(dim=1), angles.sin().mean(dim=1)
    else:
        angles = pos[:, :, None] * theta  # (A, L, F)
        cos_s = _symmetric_axis_mean(angles.cos().mean(dim=2))
        sin_s = _symmetric_axis_mean(angles.sin().mean(dim=2))
    return cos_s * attention_scaling, sin_s * attention_scaling


def similarity_rows(queries: torch.Tensor, keys: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Softmax similarity of value vectors, averaged over heads.

    Args:
        queries: ``(H, Q, d)`` value vectors of the query tokens, per KV head.
        keys: ``(H, L, d)`` value vectors of the visual tokens, per KV head.
        scale: logit scale, ``1 / sqrt(d)`` by default.

    Returns:
        ``(Q, L)``: for each query, ``mean_h softmax_i(v_q,h . v_i,h * scale)`` with the softmax over the
        ``L`` visual tokens only. Computed in float32.
    """
    if scale is None:
        scale = keys.shape[-1] ** -0.5
    logits = torch.einsum("hqd,hld->hql", queries.float(), keys.float()) * scale
    return torch.softmax(logits, dim=-1).mean(dim=0)


def foreground_scores(
    visual_values: torch.Tensor,
    query_values: torch.Tensor,
    num_seeds: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt-aware foreground scores in two stages.

    Stage 1 (semantic seeds): average the text queries' similarity rows; the ``num_seeds`` best
    visual tokens are the seeds. Stage 2 (contextual refinement): the seeds' own similarity rows are
    added, and each token's score is the mean over all rows, text and seed rows alike.

    Args:
        visual_values: ``(H, L, d)`` value vectors of the span's tokens.
        query_values: ``(H, Q, d)`` value vectors of the text queries (``Q >= 1``).
        num_seeds: seeds to pick (clamped to ``[1, L]``).

    Returns:
        ``(scores, seeds)``: ``(L,)`` float32 foreground scores and the seeds' local indices in rank order.
    """
    if query_values.shape[1] == 0:
        raise ValueError("foreground scores need at least one text query")
    text_rows = similarity_rows(query_values, visual_values, scale)
    seeds = stable_topk(text_rows.mean(dim=0), max(1, min(num_seeds, visual_values.shape[1])))
    seed_rows = similarity_rows(visual_values[:, seeds], visual_values, scale)
    scores = torch.cat([text_rows, seed_rows], dim=0).mean(dim=0)
    return scores, seeds


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
