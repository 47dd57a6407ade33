"""Selection rules of three baseline pruning methods, as small pure functions.

Like ``selection.py``, nothing here knows about models: tensors come in, indices local to one visual span
(``0 .. L-1``) come out, sorted ascending unless a docstring says otherwise. Every choice is deterministic:
equal scores go to the lower index. Similarities are computed in float64, so the rules do not depend on the
model's dtype (the releases compute them in fp16/bf16/fp32 and break ties however their kernels do).

DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More", EMNLP 2025, arXiv 2502.11494; release ``ZichenWen1/DART``, LLaVA code in
``llava/model/language_model/modeling_llama_self.py``, class ``DART`` and ``get_retained_image_token``;
defaults in ``llava/eval/model_vqa_loader.py`` and ``scripts/v1_5/eval/*.sh``; the Qwen2-VL and Qwen2.5-VL
ports in ``Qwen2-VL/Qwen2VL_DART/`` and ``Qwen2_5-VL/Qwen2_5VL_DART/`` apply the same rule):
    just before decoder layer ``K`` (``--pruned_layer 2``), pick pivots, the visual tokens with the
    largest L1 norm of layer ``K-1``'s keys (rotary embedding applied, all heads concatenated), 4 of them
    (``--pivot_image_token 4``), plus 4 text pivots from the tokens after the image
    (``--pivot_text_token 4``). Each pivot in turn keeps the not yet kept visual tokens least cosine-similar
    to it, compared on layer ``K-1``'s output hidden states passed through the model's final norm.
    See :func:`dart_select` for the budget split.

DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
CVPR 2025, arXiv 2503.02175; release ``vbdi/divprune``, ``LLaVA/llava/model/llava_arch.py``, methods
``DivPrune`` and ``pairwise_cosine_similarity``; default ratio in ``run_Divprune.sh``: ``SUBSET_RATIO=0.098``
with ``LAYER_INDEX=0``):
    greedy max-min diversity (farthest-point selection) in cosine distance ``1 - cos`` over the projected
    visual embeddings the language model receives, before its first layer.

CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning
in MLLMs", NeurIPS 2025, arXiv 2506.10967; release ``Theia-4869/CDPruner``, ``llava/model/llava_arch.py``
``encode_images`` and ``llava/model/multimodal_encoder/clip_encoder.py``):
    a DPP kernel ``diag(r) S diag(r)`` from the cosine similarity ``S`` of the projected visual features and
    the min-max normalised relevance ``r`` of each token to the instruction, and the fast greedy MAP
    inference of Chen et al. ("Fast Greedy MAP Inference for Determinantal Point Process to Improve
    Recommendation Diversity", NeurIPS 2018), before the language model.
"""

from __future__ import annotations

import math
import operator

import torch

DART_MODES = ("exact", "authors")
# DART's LLaVA defaults (llava/eval/model_vqa_loader.py, scripts/v1_5/eval/*.sh)
DART_LAYER = 2
DART_IMAGE_PIVOTS = 4
DART_TEXT_PIVOTS = 4
# DivPrune's default kept fraction (run_Divprune.sh)
DIVPRUNE_RATIO = 0.098
# CDPruner's min-max normalisation offset (llava_arch.py)
CDPRUNER_OFFSET = 1e-6


# --- shared checks -------------------------------------------------------------------------------------


def _as_int(value: object, name: str) -> int:
    if isinstance(value, bool):  # an int to Python, never a count here
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _check_keep(keep: object, length: int) -> int:
    k = _as_int(keep, "keep")
    if not 0 <= k <= length:
        raise ValueError(f"keep must be in [0, {length}] (the span's length), got {k}")
    return k


def _check_count(value: object, name: str) -> int:
    n = _as_int(value, name)
    if n < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {n}")
    return n


def _matrix(x: object, name: str, cols: int | None = None) -> torch.Tensor:
    """``x`` as a finite float64 ``(N, cols)`` matrix, or a ValueError saying what is wrong."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (tokens, features), got shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name} must be a real-valued tensor, got {x.dtype}")
    if cols is not None and x.shape[1] != cols:
        raise ValueError(f"{name} must have shape (N, {cols}), got {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)})")
    x = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has non-finite values")
    return x


def _vector(x: object, name: str, length: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.shape[0] != length or x.dtype == torch.bool:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 1-D tensor of {length} scores, got {shape}")
    x = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has non-finite values")
    return x


def _unit_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """Rows scaled to unit L2 norm. A zero row has no direction, so no cosine: that is an error here
    (the releases would divide by zero or silently clamp)."""
    norms = x.norm(dim=1, keepdim=True)
    if x.shape[0] and not bool((norms > 0).all()):
        bad = (norms.squeeze(1) == 0).nonzero().squeeze(1).tolist()
        raise ValueError(f"{name} has zero vectors at rows {bad}: cosine similarity is undefined")
    return x / norms


def _cosines(unit: torch.Tensor) -> torch.Tensor:
    """``(L, L)`` cosine similarities of unit rows, exactly symmetric and exactly 1 between rows with the same
    direction (the diagonal, LLaVA-NeXT's repeated row-separator embedding...), where ``u_i . u_j`` alone
    leaves a rounding residue of either sign. Equal scores in exact arithmetic (a token and its copy, two
    mutual nearest neighbours) then tie exactly and go to the lower index, whatever the GEMM's rounding."""
    gram = unit @ unit.T
    gram = (gram + gram.T) / 2
    _, direction = torch.unique(unit, dim=0, return_inverse=True)
    return gram.masked_fill(direction[:, None] == direction[None, :], 1.0)


def _everything_or_nothing(keep: int, length: int, device: torch.device) -> torch.Tensor | None:
    if keep >= length:
        return torch.arange(length, device=device)
    if keep == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    return None


def _rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """Indices by decreasing score, ties to the lower index."""
    return torch.sort(scores, descending=True, stable=True).indices


def _argmax_low(values: torch.Tensor) -> int:
    # torch.argmax returns the first of equal maxima (documented); no NaN can reach it here
    return int(torch.argmax(values))


# --- DART ----------------------------------------------------------------------------------------------


def dart_pivot_scores(keys: torch.Tensor) -> torch.Tensor:
    """DART's pivot criterion: the L1 norm of each token's key over all heads.

    Args:
        keys: ``(L, F)`` keys with the heads concatenated, or ``(H, L, d)`` per head: layer ``K-1``'s keys
            after the rotary embedding, as the release reads them off the attention module. Key heads
            repeated for grouped-query attention only scale the norm, so the KV heads suffice.

    Returns:
        ``(L,)`` float64 L1 norms.
    """
    if not isinstance(keys, torch.Tensor) or keys.dim() not in (2, 3) or keys.dtype == torch.bool:
        shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
        raise ValueError(f"keys must be (L, F) or (H, L, d), got {shape}")
    k = keys.detach().to(torch.float64).abs()
    return k.sum(dim=1) if k.dim() == 2 else k.sum(dim=(0, 2))


def _dart_states(
    states: torch.Tensor, scores: torch.Tensor | None, name: str, cols: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked ``(N, D)`` similarity states and ``(N,)`` pivot scores (their L1 norms when not given)."""
    x = _matrix(states, name, cols=cols)
    if scores is None:
        return x, x.abs().sum(dim=1)
    return x, _vector(scores, f"pivot scores of {name}", x.shape[0])


def _dart_quotas(mode: str, keep: int, n_image: int, n_pivots: int) -> list[int]:
    if mode == "authors":
        # the release: TOKEN_TOPK = budget // (image pivots + text pivots), the image pivots kept on top
        return [keep // n_pivots] * n_pivots
    base, extra = divmod(keep - n_image, n_pivots)  # the pivots count towards the budget
    return [base + (i < extra) for i in range(n_pivots)]


def _dart_visit_order(
    mode: str, image_pivots: list[int], text_pivots: list[int], span_start: int | None, length: int
) -> list[tuple[str, int]]:
    """The pivots in the order they pick tokens (which matters: a token taken by one is gone for the next)."""
    if mode == "exact":
        return [("image", i) for i in sorted(image_pivots)] + [("text", t) for t in sorted(text_pivots)]
    # The release loops over a Python set of the pivots' sequence positions (image pivots, then text pivots,
    # each by decreasing score); for ints that order is CPython's hash-table order, reproduced by building
    # the same set. Text token t sits at span_start + L + t: DART's text pivots follow the image.
    positions = [span_start + i for i in image_pivots] + [span_start + length + t for t in text_pivots]
    pivots = [("image", i) for i in image_pivots] + [("text", t) for t in text_pivots]
    where = dict(zip(positions, pivots))
    return [where[p] for p in set(positions)]


def dart_select(
    tokens: torch.Tensor,
    keep: int,
    *,
    num_pivots: int = DART_IMAGE_PIVOTS,
    pivot_scores: torch.Tensor | None = None,
    text_tokens: torch.Tensor | None = None,
    text_pivot_scores: torch.Tensor | None = None,
    num_text_pivots: int = DART_TEXT_PIVOTS,
    mode: str = "exact",
    span_start: int | None = None,
) -> torch.Tensor:
    """DART: keep the visual tokens least duplicated with a few pivot tokens.

    What the release feeds it (LLaVA, ``DART.forward``; default layer ``K = 2``, prefill only): just before
    decoder layer ``K`` runs, from layer ``K-1``'s outputs,

    - similarity states (``tokens``, ``text_tokens``): layer ``K-1``'s output hidden states (the hidden
      states entering layer ``K``) passed through the language model's final norm (``model.norm``, weight
      included), not the states layer ``K`` itself normalises;
    - pivot scores: the L1 norm (``torch.norm(p=1)``) of layer ``K-1``'s key states after the rotary
      embedding, all heads flattened together (:func:`dart_pivot_scores`). Text pivots are scored the same
      way over every token after the image span (question and chat template tail).

    Rule: the ``num_pivots`` visual tokens with the largest ``pivot_scores`` are kept as pivots, and the
    ``num_text_pivots`` best text tokens are pivots too (never kept: they are not visual tokens). Then each
    pivot in turn takes its quota of the remaining visual tokens (not a pivot, not taken by an earlier
    pivot) with the lowest cosine similarity to it, so no token is taken twice.

    Budget (``mode``):
        ``"exact"``: the image pivots count towards ``keep``; the other ``keep - image pivots`` tokens are
        split evenly over all pivots, the first pivots visited taking one more when it does not divide;
        pivots are visited in index order, image pivots first. Exactly ``keep`` tokens are returned.
        ``"authors"``: the release's count: every pivot takes ``keep // (image + text pivots)`` tokens and
        the image pivots come on top, so LLaVA's ``--max_num_trunction 128`` keeps ``4 + 8 * 16 = 132``
        tokens (the Qwen ports take ``int(L * (1 - reduction_ratio) / pivots)`` each, the same with
        ``keep = int(L * (1 - reduction_ratio))``). When the span runs out the release fails; here the last
        pivots take what is left. Pivots are visited in the release's order, that of a Python set of their
        sequence positions (needs ``span_start``).

    Args:
        tokens: ``(L, D)`` similarity states of the visual span.
        keep: the budget, in ``[0, L]``; ``L`` keeps everything, ``0`` nothing.
        num_pivots: image pivots (DART: 4), at most ``L`` (and ``keep`` in ``"exact"`` mode) are used.
        pivot_scores: ``(L,)`` pivot scores of the visual tokens (DART: :func:`dart_pivot_scores` of layer
            ``K-1``'s keys). ``None``: the L1 norm of ``tokens`` (the same criterion on the given states).
        text_tokens: ``(T, D)`` similarity states of the text tokens that may be pivots, or ``None``
            (image pivots only).
        text_pivot_scores: ``(T,)`` their pivot scores; ``None``: the L1 norm of ``text_tokens``.
        num_text_pivots: text pivots (DART: 4), at most ``T``.
        mode: ``"exact"`` or ``"authors"`` (see Budget).
        span_start: sequence position of the span's first token (``"authors"`` mode only).

    Returns:
        Sorted local indices of the kept visual tokens (pivots included).
    """
    x, scores = _dart_states(tokens, pivot_scores, "tokens")
    length, dim = x.shape
    keep = _check_keep(keep, length)
    if mode not in DART_MODES:
        raise ValueError(f"mode must be one of {DART_MODES}, got {mode!r}")
    n_image_wanted = _check_count(num_pivots, "num_pivots")
    n_text_wanted = _check_count(num_text_pivots, "num_text_pivots")
    if text_tokens is None and text_pivot_scores is not None:
        raise ValueError("text_pivot_scores given without text_tokens")
    t_states = x.new_zeros((0, dim)) if text_tokens is None else text_tokens
    t, t_scores = _dart_states(t_states, text_pivot_scores, "text_tokens", cols=dim)
    start = None
    if mode == "authors":
        if span_start is None:
            raise ValueError("mode='authors' visits pivots in the release's order, which needs span_start")
        start = _check_count(span_start, "span_start")
    done = _everything_or_nothing(keep, length, tokens.device)
    if done is not None:
        return done

    n_image = min(n_image_wanted, length if mode == "authors" else keep)
    image_pivots = _rank_desc(scores)[:n_image].tolist()
    text_pivots = _rank_desc(t_scores)[: min(n_text_wanted, t.shape[0])].tolist()
    n_pivots = len(image_pivots) + len(text_pivots)
    if n_pivots == 0:
        raise ValueError("DART needs at least one pivot: num_pivots > 0, or text tokens with num_text_pivots > 0")
    order = _dart_visit_order(mode, image_pivots, text_pivots, start, length)
    quotas = _dart_quotas(mode, keep, len(image_pivots), n_pivots)

    unit, t_unit = _unit_rows(x, "tokens"), _unit_rows(t, "text_tokens")
    taken = torch.zeros(length, dtype=torch.bool, device=x.device)
    taken[image_pivots] = True
    for (kind, idx), quota in zip(order, quotas):
        pool = (~taken).nonzero().squeeze(1)
        if quota == 0 or pool.numel() == 0:
            continue
        pivot = unit[idx] if kind == "image" else t_unit[idx]
        cos = unit[pool] @ pivot
        taken[pool[torch.sort(cos, stable=True).indices[:quota]]] = True  # least similar first, ties low
    return taken.nonzero().squeeze(1).to(tokens.device)


# --- DivPrune ------------------------------------------------------------------------------------------


def divprune_order(embeddings: torch.Tensor, keep: int) -> torch.Tensor:
    """DivPrune's greedy max-min selection, in the order the tokens are picked.

    Distances are cosine distances ``1 - cos(x_i, x_j)`` between the rows of ``embeddings``, exactly 0
    between rows with the same direction.

    - First pick: the token whose nearest other token is farthest (the release takes the second smallest
      entry of each distance column, the smallest being the token's zero distance to itself).
    - Then, repeatedly: the token whose distance to its nearest already picked token is largest.
    - Ties go to the lower index (``torch.argmax`` in the release does the same). Unlike the release, a
      token is never picked twice: when every remaining token duplicates a picked one (all scores 0), the
      release's argmax can return an already picked token and keep fewer than ``keep``; here the lowest
      unpicked index is taken instead.

    Args:
        embeddings: ``(L, D)`` visual embeddings (DivPrune: the projector's output, the span's input
            embeddings of the language model; LLaVA-NeXT spans include the row separators).
        keep: tokens to pick, in ``[0, L]``.

    Returns:
        ``(keep,)`` local indices in pick order.
    """
    x = _matrix(embeddings, "embeddings")
    length = x.shape[0]
    keep = _check_keep(keep, length)
    out = torch.empty(keep, dtype=torch.long)
    if keep == 0:
        return out.to(embeddings.device)
    unit = _unit_rows(x, "embeddings")
    dist = 1.0 - _cosines(unit)
    if length == 1:
        out[0] = 0
        return out.to(embeddings.device)
    off_diagonal = dist.clone()
    off_diagonal.fill_diagonal_(math.inf)
    first = _argmax_low(off_diagonal.min(dim=1).values)
    picked = torch.zeros(length, dtype=torch.bool, device=x.device)
    nearest = dist[first].clone()  # each token's distance to its nearest picked token
    out[0], picked[first] = first, True
    for i in range(1, keep):
        j = _argmax_low(nearest.masked_fill(picked, -math.inf))
        out[i], picked[j] = j, True
        nearest = torch.minimum(nearest, dist[j])
    return out.to(embeddings.device)


def divprune_select(embeddings: torch.Tensor, keep: int) -> torch.Tensor:
    """DivPrune: the ``keep`` tokens of :func:`divprune_order`, as sorted local indices.

    The release prunes before the language model's first layer (``LAYER_INDEX=0``) with
    ``keep = round(0.098 * L)`` (``SUBSET_RATIO=0.098``; ``selection.ratio_count`` rounds the same way)."""
    return torch.sort(divprune_order(embeddings, keep)).values


# --- CDPruner ------------------------------------------------------------------------------------------


def cdpruner_relevance(image_embeds: torch.Tensor, text: torch.Tensor, *, negate: bool = True) -> torch.Tensor:
    """CDPruner's relevance of each visual token to the instruction, min-max normalised.

    ``r_i = mean_m cos(image_embeds_i, text_m)``, negated when ``negate`` (the release's choice for CLIP in
    LLaVA, where patch-text similarity is inverted: the maintainers report having seen it only with that
    CLIP, issues #9 and #14), then ``(r - min r + 1e-6) / (max r - min r)``: the least relevant token gets
    ``1e-6 / range``, not 0, so it keeps a (tiny) weight. When all ``r_i`` are equal the release divides by
    zero; here every token then gets relevance 1 (no token is preferred).

    Args:
        image_embeds: ``(L, C)`` visual tokens in the text encoder's space (the release: CLIP's penultimate
            layer patch features, the ones LLaVA projects, through CLIP's ``post_layernorm`` and
            ``visual_projection``).
        text: ``(M, C)`` (or ``(C,)``) instruction embeddings (the release: CLIP text tower's ``text_embeds``
            of the question, without LLaVA's answer-format suffix, one per 77-token segment).
        negate: use ``-cos`` (the release) rather than ``cos``.

    Returns:
        ``(L,)`` float64 relevance scores.
    """
    if isinstance(text, torch.Tensor) and text.dim() == 1:
        text = text.unsqueeze(0)
    img = _matrix(image_embeds, "image_embeds")
    txt = _matrix(text, "text", cols=img.shape[1])
    if txt.shape[0] == 0:
        raise ValueError("text has no embeddings")
    rel = (_unit_rows(img, "image_embeds") @ _unit_rows(txt, "text").T).mean(dim=1)
    if negate:
        rel = -rel
    if rel.numel() == 0:
        return rel
    lo, hi = rel.min(), rel.max()
    if not bool(hi > lo):
        return torch.ones_like(rel)
    return (rel - lo + CDPRUNER_OFFSET) / (hi - lo)


def dpp_greedy_map(kernel: torch.Tensor, keep: int, *, eps: float = 1e-10) -> torch.Tensor:
    """Greedy MAP inference of a DPP (Chen et al. 2018), in pick order.

    Each step picks the item with the largest marginal gain ``d_j^2 = det(L_{S+j}) / det(L_S)`` (ties to the
    lower index) and updates every gain with one more row of the incremental Cholesky factor:
    ``e_j = (L[s, j] - <c_s, c_j>) / d_s``, ``d_j^2 -= e_j^2``.

    Numerical stop: when the best remaining gain is ``<= eps * max_j L[j, j]``, the picked items already
    span every other one (the kernel's rank is used up) and further gains are rounding noise. Chen et al.'s
    code stops there and returns fewer items. CDPruner's release has no stop: past the rank it goes on
    picking by rounding noise until a gain ``<= 0`` comes up, whose square root makes every gain NaN; its
    argmax then returns the lowest indices again and again, already picked ones included, so it keeps fewer
    tokens than its budget. Here the greedy stops and the budget is filled with the lowest unpicked indices,
    so exactly ``keep`` items come back. (With LLaVA's 576 tokens of 4096 features the rank is not reached
    at the published budgets, so this only decides degenerate inputs.)

    Args:
        kernel: ``(L, L)`` symmetric positive semi-definite kernel.
        keep: items to pick, in ``[0, L]``.
        eps: relative gain threshold of the stop (relative, so that scaling the kernel changes nothing).

    Returns:
        ``(keep,)`` indices in pick order (greedy picks, then the fill).
    """
    k = _matrix(kernel, "kernel")
    length = k.shape[0]
    if k.shape[1] != length:
        raise ValueError(f"kernel must be square, got {tuple(kernel.shape)}")
    keep = _check_keep(keep, length)
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    gains = torch.diagonal(k).clone()
    floor = eps * max(float(gains.max()), 0.0) if length else 0.0
    factor = k.new_zeros((keep, length))
    picked = torch.zeros(length, dtype=torch.bool, device=k.device)
    order: list[int] = []
    for i in range(keep):
        masked = gains.masked_fill(picked, -math.inf)
        j = _argmax_low(masked)
        gain = float(masked[j])
        if not gain > floor:
            break
        row = (k[j] - factor[:i, j] @ factor[:i]) / math.sqrt(gain)
        factor[i] = row
        gains = gains - row * row
        picked[j] = True
        order.append(j)
    fill = (~picked).nonzero().squeeze(1)[: keep - len(order)].tolist()
    return torch.tensor(order + fill, dtype=torch.long, device=kernel.device)


def cdpruner_select(
    visual: torch.Tensor,
    text: torch.Tensor | None,
    keep: int,
    *,
    image_embeds: torch.Tensor | None = None,
    relevance: torch.Tensor | None = None,
    theta: float | None = None,
    negate: bool = True,
    eps: float = 1e-10,
) -> torch.Tensor:
    """CDPruner: the greedy MAP subset of a DPP conditioned on the instruction.

    Kernel ``L = diag(w) S diag(w)``: ``S_ij = cos(visual_i, visual_j)`` over the projected visual features
    (the release: LLaVA's ``mm_projector`` output, the language model's input embeddings of the span), and
    ``w`` the relevance ``r`` of :func:`cdpruner_relevance`. The release uses ``w = r`` directly; the paper's
    trade-off ``w = exp(alpha r)``, ``alpha = theta / (2 (1 - theta))`` is in the release only as a comment
    (``theta = 0.5``), so ``theta=None`` (default) is the release and a float in ``[0, 1)`` is the paper's
    variant (``theta = 0``: plain DPP on ``S``, relevance ignored). The subset is
    :func:`dpp_greedy_map` of ``L`` (see there for the numerical stop).

    The release prunes before the language model, each image (each LLaVA-NeXT crop) to its own budget
    (``--visual_token_num``, e.g. 64/128/192 for LLaVA-1.5; per crop for LLaVA-NeXT); its min-max
    normalisation runs over all of the crops at once: pass ``relevance`` computed on them together to match.

    Args:
        visual: ``(L, D)`` projected visual features: the similarity ``S``.
        text: ``(M, C)`` (or ``(C,)``) instruction embeddings, or ``None`` when ``relevance`` is given.
        keep: tokens to keep, in ``[0, L]``.
        image_embeds: ``(L, C)`` visual tokens in the text's embedding space for the relevance; ``None``:
            ``visual`` itself (then ``C == D``).
        relevance: ``(L,)`` precomputed relevance ``r`` (replaces ``text`` and ``image_embeds``).
        theta: ``None`` (the release) or the paper's trade-off in ``[0, 1)``.
        negate: passed to :func:`cdpruner_relevance`.
        eps: passed to :func:`dpp_greedy_map`.

    Returns:
        Sorted local indices of the kept tokens.
    """
    x = _matrix(visual, "visual")
    length = x.shape[0]
    keep = _check_keep(keep, length)
    if theta is not None and not (isinstance(theta, (int, float)) and 0 <= theta < 1):
        raise ValueError(f"theta must be None or in [0, 1), got {theta!r}")
    if relevance is not None:
        if text is not None or image_embeds is not None:
            raise ValueError("give either relevance or text (with image_embeds), not both")
        rel = _vector(relevance, "relevance", length)
    else:
        if text is None:
            raise ValueError("cdpruner_select needs text embeddings or a relevance vector")
        emb = visual if image_embeds is None else image_embeds
        if isinstance(emb, torch.Tensor) and emb.dim() == 2 and emb.shape[0] != length:
            raise ValueError(f"image_embeds must have {length} rows like visual, got {tuple(emb.shape)}")
        rel = cdpruner_relevance(emb, text, negate=negate).to(x.device)
    done = _everything_or_nothing(keep, length, visual.device)
    if done is not None:
        return done
    weight = rel if theta is None else torch.exp(theta / (2.0 * (1.0 - theta)) * rel)
    unit = _unit_rows(x, "visual")
    kernel = weight[:, None] * _cosines(unit) * weight[None, :]
    return torch.sort(dpp_greedy_map(kernel, keep, eps=eps)).values
