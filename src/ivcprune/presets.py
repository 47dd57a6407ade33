"""Per-model paper presets (from the authors' released configurations; see METHOD.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """Default knobs of IVC-Prune for one model family."""

    family: str
    layer: int
    rule: str  # "fill" (budget) or "union"
    budget: float
    ivc_ratio: float
    seed_ratio: float
    foreground_ratio: float  # union rule only
    note: str


# Pruning layer K by decoder depth, where the authors released a setting for that checkpoint.
_QWEN25_K = {28: 16, 36: 22}  # Qwen2.5-VL-7B (28 layers), Qwen2.5-VL-3B (36 layers)
# Qwen2-VL: the pruning code path of the authors' fork prunes before layer 16 (their evaluation
# registry lists K=2, but that value never reaches the code that prunes).
_QWEN2_K = {28: 16}


def _scaled_k(depth: int, table: dict[int, int]) -> int:
    if depth in table:
        return table[depth]
    # Other depths (other sizes, tiny test models): the 7B ratio 16/28, kept inside [1, depth-1].
    return max(1, min(depth - 1, round(depth * 16 / 28)))


_FAMILIES = {
    "qwen2_5_vl": dict(
        family="Qwen2.5-VL",
        k_table=_QWEN25_K,
        rule="fill",
        note="K=16 of 28 (7B) / 22 of 36 (3B); IVC 10% cos + 10% sin, seeds 1%, fill to 50% by foreground",
    ),
    "qwen2_vl": dict(
        family="Qwen2-VL",
        k_table=_QWEN2_K,
        rule="union",
        note="K=16 of 28; keep IVC 10% cos + 10% sin, seeds 1% and top 40% foreground (union)",
    ),
}


def preset_for(model_type: str, num_layers: int) -> Preset:
    """The paper preset for a model family (``config.model_type``) with ``num_layers`` decoder layers."""
    fam = _FAMILIES[model_type]
    return Preset(
        family=fam["family"],
        layer=_scaled_k(num_layers, fam["k_table"]),
        rule=fam["rule"],
        budget=0.5,
        ivc_ratio=0.10,
        seed_ratio=0.01,
        foreground_ratio=0.40,
        note=fam["note"],
    )
