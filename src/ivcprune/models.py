"""Loading models: real checkpoints (local path or hub id, as transformers loads them) and models with
random weights built from the embedded configurations of real checkpoints (no download needed).

A model spec is a path / hub id, ``toy`` (the embedded grounding model), or ``random:NAME`` with NAME one
of :data:`RANDOM_CONFIGS` (``random:qwen2.5-vl-7b``; the shapes live in each family's file); ``overrides``
(``{"num_hidden_layers": 8}``, ``{"vision.depth": 2}``)
change the text config, or the vision config with a ``vision.`` prefix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .families import FAMILIES, family_class, random_spec
from .tiny import TOKEN_IDS, processor_for_config

# The embedded grounding model (trained by `ivcprune train-toy`), shipped inside the package.
TOY_DIR = Path(__file__).resolve().parent / "assets" / "toy-grounding"

# ``random:NAME`` shapes, from every family
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {name: spec for cls in FAMILIES.values()
                                              for name, spec in cls.random_configs.items()}


def random_config(name: str, overrides: dict[str, Any] | None = None, attn_implementation: str | None = None):
    """A transformers config with the shapes of ``name`` (see :data:`RANDOM_CONFIGS`), plus overrides."""
    family, spec = random_spec(name)
    cfg = family.build_config(spec, overrides)
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
    """A model with random weights and the shapes of ``name`` (nothing is downloaded), built directly in
    ``dtype`` on ``device`` (a 7B in bf16 never passes through float32)."""
    cfg = random_config(name, overrides, attn_implementation)
    _, model_cls = family_class(cfg.model_type).model_classes()
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(cfg)
            family_class(cfg.model_type).init_random_weights(model, cfg.get_text_config().initializer_range)
    finally:
        torch.set_default_dtype(default)
    return model.to(dtype).eval()


def tiny_model(name: str = "tiny-qwen2.5-vl", *, seed: int = 0, init_std: float = 0.02, overrides=None,
               attn_implementation: str = "sdpa"):
    """A tiny random-weight model (``name``: a ``tiny-*`` config of any family) whose token ids match
    :func:`ivcprune.tiny.build_tokenizer`."""
    cfg = random_config(name, overrides, attn_implementation)
    text = cfg.get_text_config()
    cfg.initializer_range = text.initializer_range = cfg.vision_config.initializer_range = init_std
    _, model_cls = family_class(cfg.model_type).model_classes()
    torch.manual_seed(seed)
    model = model_cls(cfg)
    family_class(cfg.model_type).init_random_weights(model, init_std)
    return model.eval()


def save_tiny_checkpoint(path: str | Path, name: str = "tiny-qwen2.5-vl", *, seed: int = 0, init_std: float = 0.02,
                         overrides=None, processor_kwargs: dict[str, Any] | None = None) -> Path:
    """Write a tiny random-weight checkpoint (``name``: a ``tiny-*`` config of any family) with its family's
    processor (:func:`ivcprune.tiny.processor_for_config`, given ``processor_kwargs``) to ``path``."""
    path = Path(path)
    model = tiny_model(name, seed=seed, init_std=init_std, overrides=overrides)
    model.generation_config.eos_token_id = TOKEN_IDS["eos_token_id"]
    model.generation_config.pad_token_id = TOKEN_IDS["pad_token_id"]
    model.generation_config.bos_token_id = TOKEN_IDS["bos_token_id"]
    model.save_pretrained(path)
    processor_for_config(model.config, **(processor_kwargs or {})).save_pretrained(path)
    return path


def check_overrides(name: str, overrides: dict[str, Any]) -> None:
    """Every ``FIELD`` / ``vision.FIELD`` of ``overrides`` exists in ``random:name``'s config."""
    family, spec = random_spec(name)
    default = family.build_config(spec)
    for key in overrides:
        part, _, field = key.rpartition(".")
        config = {"": default.get_text_config(), "text": default.get_text_config(),
                  "vision": default.vision_config}.get(part)
        if config is None:
            raise ValueError(f"--set {key}: use FIELD for the text config or vision.FIELD")
        if not hasattr(config, field):
            where = "vision config" if part == "vision" else "text config"
            raise ValueError(f"--set {key}: the {where} of random:{name} has no field {field!r}")


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
    """``toy`` -> the embedded grounding model's folder; a local folder as given; a spec that can only be a
    path (``/``, ``./``, ``~``, several ``/``) and does not exist -> :class:`FileNotFoundError`; anything
    else is a hub id."""
    if spec.startswith("random:"):
        random_spec(spec.split(":", 1)[1])  # unknown names fail here, with the list of known ones
        return spec
    if spec != "toy":
        if Path(spec).expanduser().exists():
            return str(Path(spec).expanduser())
        if spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1 or spec.endswith("/"):
            raise FileNotFoundError(f"model folder not found: {spec}")
        return spec
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

    try:
        config = AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as e:
        where = "a local folder" if Path(spec).exists() else "no local folder of that name; as a hub id"
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise OSError(f"cannot load model {spec!r} ({where}): {first.strip()}") from None
    kwargs: dict[str, Any] = {"dtype": dtype if dtype == "auto" else _dtype(dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map:
        kwargs["device_map"] = device_map
    family = FAMILIES.get(config.model_type)
    # other families load as transformers would; the pruning methods report them unsupported
    model_cls = family.model_classes()[1] if family else AutoModelForImageTextToText
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
    """Model inputs (batch of one) for a chat-shaped prompt with one image of about ``image_tokens`` visual
    tokens, for models without a processor (random weights): the family's token layout, noise pixels.
    Returns ``(inputs, (h, w))`` with the merged token grid."""
    inputs, grid = family_class(config.model_type).synthetic_inputs(config, image_tokens, text_tokens, seed)
    return {k: v.to(device) for k, v in inputs.items()}, grid
