"""Loading models: real checkpoints (local path or hub id, as transformers loads them) and models with
random weights built from the embedded configurations of real checkpoints (no download needed).

A model spec is either a path / hub id, or ``random:NAME`` with NAME one of :data:`RANDOM_CONFIGS`
(``random:qwen2.5-vl-7b``); ``overrides`` (``{"num_hidden_layers": 8}``, ``{"vision.depth": 2}``)
change the text config, or the vision config with a ``vision.`` prefix.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .tiny import TOKEN_IDS as TINY_TOKEN_IDS

_QWEN_TOKENS = dict(
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    bos_token_id=151643,
    eos_token_id=151645,
)

def _text(vocab, hidden, ffn, layers, heads, kv_heads, max_pos, tied, theta=1000000.0, section=(16, 24, 24)):
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": list(section)},
        tie_word_embeddings=tied,
    )


# Qwen2.5-VL vision tower (window attention, SwiGLU); the merger's output width follows the LLM.
_QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")
# Qwen2-VL vision tower (full attention, QuickGELU MLP); `hidden_size` is the merger's output width.
_QWEN2_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, patch_size=14, spatial_merge_size=2,
                     temporal_patch_size=2, hidden_act="quick_gelu")

# Shapes of released checkpoints (their config.json), so benchmarks can run with random weights.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-7b": dict(model_type="qwen2_5_vl", text=_text(152064, 3584, 18944, 28, 28, 4, 128000, False),
                          vision=_QWEN25_VISION, tokens=_QWEN_TOKENS),
    "qwen2.5-vl-3b": dict(model_type="qwen2_5_vl", text=_text(151936, 2048, 11008, 36, 16, 2, 128000, True),
                          vision=_QWEN25_VISION, tokens=_QWEN_TOKENS),
    "qwen2-vl-7b": dict(model_type="qwen2_vl", text=_text(152064, 3584, 18944, 28, 28, 4, 32768, False),
                        vision=_QWEN2_VISION, tokens=_QWEN_TOKENS),
    "qwen2-vl-2b": dict(model_type="qwen2_vl", text=_text(151936, 1536, 8960, 28, 12, 2, 32768, True),
                        vision=_QWEN2_VISION, tokens=_QWEN_TOKENS),
}

# Tiny models use the ids of the project's own tokenizer (ivcprune.tiny).
_TINY_TEXT = _text(512, 64, 128, 4, 4, 2, 4096, False, theta=10000.0, section=(2, 3, 3))
RANDOM_CONFIGS["tiny-qwen2.5-vl"] = dict(
    model_type="qwen2_5_vl",
    text=_TINY_TEXT,
    vision=dict(_QWEN25_VISION, depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1],
                window_size=56),
    tokens=dict(TINY_TOKEN_IDS),
)
RANDOM_CONFIGS["tiny-qwen2-vl"] = dict(
    model_type="qwen2_vl",
    text=_TINY_TEXT,
    vision=dict(_QWEN2_VISION, depth=2, embed_dim=32, mlp_ratio=2, num_heads=2, hidden_act="quick_gelu"),
    tokens=dict(TINY_TOKEN_IDS),
)


def _classes(model_type: str):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    return {
        "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
        "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    }[model_type]


def random_config(name: str, overrides: dict[str, Any] | None = None, attn_implementation: str | None = None):
    """A transformers config with the shapes of ``name`` (see :data:`RANDOM_CONFIGS`), plus overrides."""
    if name not in RANDOM_CONFIGS:
        raise ValueError(f"unknown random config {name!r}; choose from {', '.join(RANDOM_CONFIGS)}")
    spec = copy.deepcopy(RANDOM_CONFIGS[name])
    for key, value in (overrides or {}).items():
        part, _, field = key.rpartition(".")
        target = {"": "text", "text": "text", "vision": "vision"}.get(part)
        if target is None:
            raise ValueError(f"override {key!r}: use FIELD for the text config or vision.FIELD")
        spec[target][field] = value
    # The vision merger must project to the LLM width.
    out_key = "out_hidden_size" if spec["model_type"] == "qwen2_5_vl" else "hidden_size"
    if f"vision.{out_key}" not in (overrides or {}):
        spec["vision"][out_key] = spec["text"]["hidden_size"]
    config_cls, _ = _classes(spec["model_type"])
    tokens = spec["tokens"]
    text_tokens = {k: tokens[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in tokens}
    cfg = config_cls(text_config={**spec["text"], **text_tokens}, vision_config=spec["vision"], **tokens)
    if attn_implementation:
        cfg._attn_implementation = attn_implementation
    return cfg


def random_model(
    name: str,
    overrides: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = "sdpa",
    device: str | torch.device = "cpu",
):
    """A model with random weights and the shapes of ``name`` (nothing is downloaded)."""
    cfg = random_config(name, overrides, attn_implementation)
    _, model_cls = _classes(cfg.model_type)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls(cfg)
    return model.to(dtype).eval()


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["num_hidden_layers=8", "vision.depth=2"]`` -> dict with ints / floats / strings."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        value: Any = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        out[key.strip()] = value
    return out


def resolve_model_spec(spec: str) -> str:
    """``toy`` -> the embedded grounding model's folder; any other spec unchanged."""
    if spec != "toy":
        return spec
    from .grounding.toy import TOY_DIR

    if not (TOY_DIR / "config.json").exists():
        raise FileNotFoundError(f"the embedded toy model is missing ({TOY_DIR}); train it with `ivcprune train-toy`")
    return str(TOY_DIR)


def load_model(
    spec: str,
    *,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str | None = None,
    device_map: str | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
):
    """``(model, processor)`` for a path, a hub id, or ``random:NAME`` (processor is ``None`` then)."""
    if spec.startswith("random:"):
        torch_dtype = torch.float32 if dtype == "auto" else _dtype(dtype)
        device = "cuda" if device_map in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
        model = random_model(
            spec.split(":", 1)[1],
            overrides,
            seed=seed,
            dtype=torch_dtype,
            attn_implementation=attn_implementation or "sdpa",
            device=device,
        )
        return model, None
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    config = AutoConfig.from_pretrained(spec)
    kwargs: dict[str, Any] = {"dtype": dtype if dtype == "auto" else _dtype(dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map:
        kwargs["device_map"] = device_map
    try:
        _, model_cls = _classes(config.model_type)
    except KeyError:
        model_cls = AutoModelForImageTextToText  # the adapter lookup reports unsupported families
    model = model_cls.from_pretrained(spec, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(spec)
    return model, processor


def _dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if value not in table:
        raise ValueError(f"unknown dtype {value!r}; choose from auto, {', '.join(table)}")
    return table[value]


def synthetic_inputs(config, image_tokens: int = 256, text_tokens: int = 32, *, seed: int = 0, device="cpu"):
    """Model inputs for a chat-shaped prompt with one image of about ``image_tokens`` visual tokens.

    For models without a processor (random weights): the token layout is the one Qwen-VL's processor
    produces (``... <vision_start> <image_pad>*N <vision_end> question <im_end> ... assistant``), the
    pixel values are noise of the shape the vision tower expects. Returns ``(inputs, (h, w))`` with
    the merged token grid.
    """
    vc = config.vision_config
    merge = vc.spatial_merge_size
    gh = max(1, int(image_tokens**0.5))
    while image_tokens % gh:
        gh -= 1
    gw = image_tokens // gh
    n_vis = gh * gw
    g = torch.Generator().manual_seed(seed)
    vocab = config.get_text_config().vocab_size
    low = 10
    high = min(vocab, config.image_token_id, config.vision_start_token_id) - 1
    text = torch.randint(low, high, (text_tokens + 8,), generator=g)
    pre = text[:4].tolist() + [config.vision_start_token_id]
    post = [config.vision_end_token_id] + text[4:].tolist()
    ids = torch.tensor([pre + [config.image_token_id] * n_vis + post])
    patches = (gh * merge) * (gw * merge)
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(patches, patch_dim, generator=g),
        "image_grid_thw": torch.tensor([[1, gh * merge, gw * merge]]),
        "mm_token_type_ids": (ids == config.image_token_id).int(),
    }
    return {k: v.to(device) for k, v in inputs.items()}, (gh, gw)
