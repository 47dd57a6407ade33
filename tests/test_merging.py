"""The baselines' pure pieces: the last-query attention against real transformers attention modules (eager
weights), and VisionZip's selection and merge against a plain-Python loop and hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, Qwen3Config
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLAttention, Qwen2VLRotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding

from ivcprune.merging import last_query_attention, visionzip_counts, visionzip_select

HIDDEN, HEADS, KV_HEADS = 64, 4, 2


# ---------------------------------------------------------------- last_query_attention vs eager attention


def _llama():
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, num_hidden_layers=1, vocab_size=32, attention_bias=True)
    return cfg, LlamaAttention(cfg, layer_idx=0), LlamaRotaryEmbedding(cfg), ("q_proj", "k_proj")


def _qwen2_vl():
    cfg = Qwen2VLTextConfig(hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=HEADS,
                            num_key_value_heads=KV_HEADS, num_hidden_layers=1, vocab_size=32,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    return cfg, Qwen2VLAttention(cfg, layer_idx=0), Qwen2VLRotaryEmbedding(cfg), ("q_proj", "k_proj")


def _qwen3():
    cfg = Qwen3Config(hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=HEADS, head_dim=32,
                      num_key_value_heads=1, num_hidden_layers=1, vocab_size=32)
    return cfg, Qwen3Attention(cfg, layer_idx=0), Qwen3RotaryEmbedding(cfg), ("q_norm", "k_norm")


def _eager_and_ours(build, position_ids, pad: int = 0, seed: int = 0):
    """Run a real attention module (eager) on random hidden states; return its last row averaged over heads
    and ``last_query_attention`` from the q/k captured where the module hands them to the rotary embedding."""
    torch.manual_seed(seed)
    cfg, attn, rotary, (q_site, k_site) = build()
    cfg._attn_implementation = "eager"
    for name, p in attn.named_parameters():
        # peaked attention, so that a wrong rotation or head mapping shows (q/k norms rescale to unit RMS)
        torch.nn.init.normal_(p, std=3.0 if "norm" in name else 0.3)
    n = position_ids.shape[-1]
    hidden = torch.randn(1, n, HIDDEN)
    cos, sin = rotary(hidden, position_ids)
    mask = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)
    mask[:, :pad] = torch.finfo(torch.float32).min  # left padding: no one attends to the first `pad` slots
    captured = {}
    hooks = [getattr(attn, site).register_forward_hook(lambda m, a, out, s=site: captured.__setitem__(s, out))
             for site in (q_site, k_site)]
    with torch.no_grad():
        _, weights = attn(hidden, position_embeddings=(cos, sin), attention_mask=mask[None, None])
    for h in hooks:
        h.remove()
    head_dim = cos.shape[-1]
    q = captured[q_site].reshape(n, -1, head_dim).transpose(0, 1)[:, -1]  # (H, d) of the last token
    k = captured[k_site].reshape(n, -1, head_dim).transpose(0, 1)  # (H_kv, S, d)
    key_mask = None
    if pad:
        key_mask = torch.ones(n, dtype=torch.bool)
        key_mask[:pad] = False
    ours = last_query_attention(q, k, cos[0], sin[0], attn.scaling, attn.num_key_value_groups, key_mask=key_mask)
    return weights[0, :, -1].float().mean(dim=0), ours


def _gapped_positions(n: int, seed: int) -> torch.Tensor:
    """Increasing position ids with gaps, as a cut sequence keeps them."""
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.randint(1, 4, (n,), generator=g), 0)[None]


@pytest.mark.parametrize("build", [_llama, _qwen3], ids=["llama-gqa", "qwen3-qknorm-mqa"])
def test_last_query_attention_equals_eager_last_row(build):
    eager, ours = _eager_and_ours(build, _gapped_positions(23, seed=1))
    assert ours.dtype == torch.float32 and ours.shape == (23,)
    torch.testing.assert_close(ours, eager, atol=2e-6, rtol=1e-5)
    assert eager.max() > 3 / 23  # the check is not vacuous: attention is far from uniform


def test_last_query_attention_equals_eager_with_mrope():
    n, g = 20, torch.Generator().manual_seed(2)
    # M-RoPE: distinct (t, h, w) rows; the rotary module recomposes the sections into (S, head_dim) tables
    position_ids = torch.stack([torch.arange(n), torch.randint(0, 9, (n,), generator=g),
                                torch.randint(0, 9, (n,), generator=g)])[:, None]
    eager, ours = _eager_and_ours(_qwen2_vl, position_ids, seed=3)
    torch.testing.assert_close(ours, eager, atol=2e-6, rtol=1e-5)


def test_last_query_attention_key_mask_matches_padded_eager():
    eager, ours = _eager_and_ours(_llama, _gapped_positions(18, seed=4), pad=5, seed=5)
    assert (ours[:5] == 0).all()
    torch.testing.assert_close(ours, eager, atol=2e-6, rtol=1e-5)
    assert ours.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_last_query_attention_closed_form_without_rotation():
    # cos = 1, sin = 0: no rotation; one kv head shared by two query heads
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    ones, zeros = torch.ones(3, 2), torch.zeros(3, 2)
    out = last_query_attention(q, k, ones, zeros, 1.0, 2)
    h0 = torch.softmax(torch.tensor([1.0, 0.0, 0.0]), 0)
    h1 = torch.softmax(torch.tensor([0.0, 2.0, 0.0]), 0)
    torch.testing.assert_close(out, (h0 + h1) / 2)
    # the query's own tables can be given apart from the keys': a 90 degree turn maps (1, 0) to (0, 1)
    turned = last_query_attention(q[:1], k, ones, zeros, 1.0, 1, query_cos=torch.zeros(2), query_sin=torch.ones(2))
    torch.testing.assert_close(turned, torch.softmax(torch.tensor([0.0, 1.0, 0.0]), 0))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(q=torch.zeros(4)), "q must be"),
        (dict(k=torch.zeros(5, 4)), "k must be"),
        (dict(k=torch.zeros(2, 5, 6)), "head dims differ"),
        (dict(num_key_value_groups=3), "query heads do not match"),
        (dict(num_key_value_groups=1.5), "must be an integer"),
        (dict(scaling=0.0), "scaling"),
        (dict(scaling=float("nan")), "scaling"),
        (dict(cos=torch.zeros(4, 4)), "cos must have shape"),
        (dict(sin=torch.zeros(5, 2)), "sin must have shape"),
        (dict(query_cos=torch.zeros(5)), "query_cos"),
        (dict(key_mask=torch.ones(5)), "key_mask must be a bool"),
        (dict(key_mask=torch.zeros(5, dtype=torch.bool)), "hides every key"),
    ],
)
def test_last_query_attention_rejects_bad_input(change, message):
    args = dict(q=torch.zeros(4, 4), k=torch.zeros(2, 5, 4), cos=torch.ones(5, 4), sin=torch.zeros(5, 4),
                scaling=0.5, num_key_value_groups=2)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        last_query_attention(**args)


# ---------------------------------------------------------------- visionzip_select


def _loop_visionzip(cls_attention, keys, features, dominant, contextual, merge="release"):
    """VisionZip restated with Python lists and loops (no top-k, argmax or matmul)."""
    scores = cls_attention.double().reshape(-1, cls_attention.shape[-1]).sum(0).tolist()
    metric = keys.double().reshape(-1, *keys.shape[-2:]).mean(0).tolist()
    feats = features.double().tolist()
    n = len(scores)
    dom = sorted(range(n), key=lambda i: (-scores[i], i))[:dominant]
    rest = [i for i in range(n) if i not in dom]
    if contextual == 0:
        return dom, [], [], [-1] * n
    step = max(1, len(rest) // contextual)
    targets = [rest[p] for p in range(0, len(rest), step)][:contextual]
    unit = []
    for v in metric:
        norm = math.sqrt(sum(x * x for x in v))
        unit.append([x / norm for x in v] if norm > 0 else [0.0] * len(v))
    groups = {t: [] for t in targets}
    assignment = [-1] * n
    for j, t in enumerate(targets):
        assignment[t] = j
    for i in rest:
        if i in groups:
            continue
        sims = [sum(a * b for a, b in zip(unit[i], unit[t])) for t in targets]
        best = max(range(len(targets)), key=lambda j: (sims[j], -j))
        groups[targets[best]].append(i)
        assignment[i] = best
    merged = []
    for t in targets:
        members = groups[t]
        col_sums = [sum(feats[i][d] for i in members) for d in range(len(feats[t]))]
        if merge == "release":
            merged.append([feats[t][d] + col_sums[d] / max(1, len(members)) for d in range(len(feats[t]))])
        else:
            merged.append([(feats[t][d] + col_sums[d]) / (len(members) + 1) for d in range(len(feats[t]))])
    return dom, targets, merged, assignment


def _check_against_loop(cls_attention, keys, features, dominant, contextual, merge="release"):
    got = visionzip_select(cls_attention, keys, features, dominant, contextual, merge=merge)
    dom, targets, merged, assignment = _loop_visionzip(cls_attention, keys, features, dominant, contextual, merge)
    assert got.dominant.tolist() == dom
    assert got.targets.tolist() == targets
    assert got.assignment.tolist() == assignment
    assert got.merged.shape == (contextual, features.shape[1])
    if contextual:
        torch.testing.assert_close(got.merged.double(), torch.tensor(merged, dtype=torch.float64),
                                   atol=1e-5, rtol=1e-5)
    assert got.kept.tolist() == sorted(dom + targets)
    return got


def test_visionzip_hand_case_six_tokens_two_clusters():
    cls = torch.tensor([0.9, 0.1, 0.2, 0.05, 0.3, 0.15])
    # tokens 1, 2 point along x; tokens 3, 4, 5 along y
    keys = torch.tensor([[1.0, 1.0], [1.0, 0.1], [0.9, 0.0], [0.1, 1.0], [0.0, 0.8], [0.2, 1.0]])
    feats = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, 4.0], [10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    got = visionzip_select(cls, keys, feats, dominant=1, contextual=2)
    # remaining 1..5 (R=5), step 5 // 2 = 2: targets are the 1st and 3rd remaining tokens
    assert got.dominant.tolist() == [0] and got.targets.tolist() == [1, 3]
    assert got.assignment.tolist() == [-1, 0, 0, 1, 1, 1]
    torch.testing.assert_close(got.merged, torch.tensor([[4.0, 6.0], [50.0, 70.0]]))  # target + mean(others)
    mean = visionzip_select(cls, keys, feats, dominant=1, contextual=2, merge="mean")
    torch.testing.assert_close(mean.merged, torch.tensor([[2.0, 3.0], [30.0, 40.0]]))
    assert got.kept.tolist() == [0, 1, 3]


def test_visionzip_matches_loop_on_random_spans():
    g = torch.Generator().manual_seed(0)
    for length, dominant, contextual in [(30, 10, 4), (30, 0, 7), (17, 5, 12), (50, 3, 1), (9, 8, 1), (12, 2, 3)]:
        cls = torch.rand(3, length, generator=g)  # per head: summed over heads
        keys = torch.randn(2, length, 5, generator=g)  # per head: averaged over heads
        feats = torch.randn(length, 6, generator=g)
        for merge in ("release", "mean"):
            _check_against_loop(cls, keys, feats, dominant, contextual, merge)


def test_visionzip_ties_go_to_the_lower_index():
    g = torch.Generator().manual_seed(1)
    length = 24
    cls = torch.randint(0, 3, (length,), generator=g).float()  # many equal CLS scores
    # keys of norm 1 or 0 along the axes: similarities are exactly 0 or +-1, so exact ties are frequent
    axes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [0.0, 0.0]])
    keys = axes[torch.randint(0, 5, (length,), generator=g)]
    feats = torch.randn(length, 3, generator=g)
    for dominant, contextual in [(5, 4), (0, 6), (11, 13)]:
        _check_against_loop(cls, keys, feats, dominant, contextual)
    got = visionzip_select(torch.ones(4), torch.ones(4, 2), torch.arange(8.0).reshape(4, 2), 2, 1)
    assert got.dominant.tolist() == [0, 1] and got.targets.tolist() == [2]
    # equal keys everywhere: each non-target joins the first target
    got = visionzip_select(torch.zeros(6), torch.ones(6, 3), torch.zeros(6, 1), 0, 3)
    assert got.targets.tolist() == [0, 2, 4] and got.assignment.tolist() == [0, 0, 1, 0, 2, 0]


def test_visionzip_edge_counts():
    g = torch.Generator().manual_seed(2)
    cls, keys, feats = torch.rand(7, generator=g), torch.randn(7, 4, generator=g), torch.randn(7, 3, generator=g)
    only_dominant = _check_against_loop(cls, keys, feats, 3, 0)
    assert only_dominant.targets.numel() == 0 and (only_dominant.assignment == -1).all()
    every_rest_a_target = _check_against_loop(cls, keys, feats, 3, 4)
    torch.testing.assert_close(every_rest_a_target.merged, feats[every_rest_a_target.targets])  # nothing joined
    _check_against_loop(cls, keys, feats, 0, 1)  # one contextual token holding the whole span
    _check_against_loop(cls, keys, feats, 7, 0)


def test_visionzip_keeps_feature_dtype_and_rank_order():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(10, 4, generator=g).to(torch.bfloat16)
    cls = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.0, 0.3, 0.8, 0.4, 0.6, 0.7])
    got = visionzip_select(cls, torch.randn(10, 4, generator=g), feats, 4, 2)
    assert got.merged.dtype == torch.bfloat16
    assert got.dominant.tolist() == [3, 6, 9, 8]  # rank order, best first


def test_visionzip_counts_reproduce_the_release_settings():
    assert visionzip_counts(64) == (54, 10)
    assert visionzip_counts(128) == (108, 20)
    assert visionzip_counts(192) == (162, 30)
    assert visionzip_counts(1) == (1, 0)
    assert visionzip_counts(10, contextual_share=0.5) == (5, 5)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(features=torch.zeros(6)), "features must be"),
        (dict(cls_attention=torch.zeros(5)), "cls_attention must be"),
        (dict(keys=torch.zeros(5, 2)), "keys must be"),
        (dict(keys=torch.zeros(1, 1, 6, 2)), "keys must be"),
        (dict(dominant=-1), "dominant must be"),
        (dict(contextual=1.5), "contextual must be"),
        (dict(dominant=True), "dominant must be"),
        (dict(dominant=4, contextual=3), "between 1 and"),
        (dict(dominant=0, contextual=0), "between 1 and"),
        (dict(cls_attention=torch.tensor([0.1, float("nan"), 0, 0, 0, 0])), "non-finite"),
        (dict(keys=torch.full((6, 2), float("inf"))), "non-finite"),
        (dict(merge="sum"), "merge must be"),
    ],
)
def test_visionzip_rejects_bad_input(change, message):
    args = dict(cls_attention=torch.rand(6), keys=torch.randn(6, 2), features=torch.randn(6, 3),
                dominant=2, contextual=2)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        visionzip_select(**args)


def test_visionzip_counts_reject_bad_input():
    with pytest.raises(ValueError, match="budget"):
        visionzip_counts(-1)
    with pytest.raises(ValueError, match="contextual_share"):
        visionzip_counts(64, contextual_share=1.5)
