"""A small fast tokenizer with Qwen-VL's special tokens and chat format, and real processors around it
(tiny checkpoints with random weights are :func:`ivcprune.models.save_tiny_checkpoint`'s): Qwen-VL's (Qwen3-VL's
too), and LLaVA-1.5's and InternVL's with their own spellings of the same token ids (:func:`processor_for_config`).

Everything here is built locally, so tests, benchmarks and demos run offline:
``AutoProcessor.from_pretrained(dir)`` loads the result exactly as it loads a downloaded checkpoint's.
"""

from __future__ import annotations

# Same order as Qwen's added tokens, placed right after the 256 byte tokens.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
SPECIAL_IDS = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}

# Token ids a model must use to work with this tokenizer.
TOKEN_IDS = dict(
    image_token_id=SPECIAL_IDS["<|image_pad|>"],
    video_token_id=SPECIAL_IDS["<|video_pad|>"],
    vision_start_token_id=SPECIAL_IDS["<|vision_start|>"],
    vision_end_token_id=SPECIAL_IDS["<|vision_end|>"],
    bos_token_id=SPECIAL_IDS["<|endoftext|>"],
    eos_token_id=SPECIAL_IDS["<|im_end|>"],
    pad_token_id=SPECIAL_IDS["<|endoftext|>"],
)

DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen-VL chat format: a default system turn, media as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(merges: list[tuple[str, str]] | None = None, vocab_extra: dict[str, int] | None = None, *,
                    renamed: dict[str, str] | None = None, chat_template: str = CHAT_TEMPLATE, **named_tokens):
    """Byte-level BPE tokenizer (256 byte tokens, optional merges) plus Qwen-VL's special tokens.

    ``renamed`` spells some special tokens another family's way at the same ids (``{"<|image_pad|>":
    "<image>"}``); ``named_tokens`` become tokenizer attributes (``start_image_token="<img>"`` gives
    ``tokenizer.start_image_token`` and ``tokenizer.start_image_token_id``), as real checkpoints declare them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    next_id = 256 + len(SPECIAL_TOKENS)
    for tok in vocab_extra or {}:
        vocab[tok] = next_id
        next_id += 1
    core = Tokenizer(models.BPE(vocab=vocab, merges=list(merges or [])))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    specials = [(renamed or {}).get(t, t) for t in SPECIAL_TOKENS]
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
        chat_template=chat_template,
        extra_special_tokens=named_tokens or None,
    )
    image = (renamed or {}).get("<|image_pad|>", "<|image_pad|>")
    assert tok.convert_tokens_to_ids(image) == TOKEN_IDS["image_token_id"]
    return tok


def build_processor(model_type: str = "qwen2_5_vl", *, min_pixels: int = 4 * 28 * 28, max_pixels: int = 448 * 448,
                    tokenizer=None):
    """The transformers Qwen-VL processor (image processor, video processor, tokenizer, chat template)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = tokenizer or build_tokenizer()
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    cls = Qwen2_5_VLProcessor if model_type == "qwen2_5_vl" else Qwen2VLProcessor
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


# Qwen3-VL's chat format: Qwen-VL's turns and media, without a default system turn.
QWEN3_VL_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n" + DEFAULT_SYSTEM
    + "<|im_end|>\n{% endif %}", "")


def build_qwen3_vl_processor(*, min_pixels: int = 4 * 32 * 32, max_pixels: int = 448 * 448, patch_size: int = 16,
                             merge_size: int = 2):
    """Qwen3-VL's processor as its checkpoints configure it: Qwen2-VL's image processor with 16-pixel patches and
    mean/std 0.5, Qwen3-VL's video processor (every frame its own block after a ``<t seconds>`` timestamp), the
    tiny tokenizer and Qwen3-VL's chat format."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                                            merge_size=merge_size, temporal_patch_size=2, **norm)
    video_processor = Qwen3VLVideoProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                                            patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                                            cap_pixels_per_frame=True, **norm)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                            video_processor=video_processor, chat_template=QWEN3_VL_CHAT_TEMPLATE)


# LLaVA-1.5's chat format as llava-hf's checkpoints write it: "USER: <image>\n{text} ASSISTANT:", a system turn
# as plain text before it, earlier answers as "ASSISTANT: {answer} ".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'] | upper }}: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }} {% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# InternVL's chat format as the -hf checkpoints write it: Qwen-style turns without a default system turn, an
# image as <IMG_CONTEXT> (the processor expands it to <img> + tiles + </img>), a video as <video>.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_llava_processor(image_size: int = 336, patch_size: int = 14, *,
                          vision_feature_select_strategy: str = "default", do_pad: bool = False):
    """LLaVA-1.5's processor as llava-hf configures it for its 1.5 checkpoints: CLIP normalisation, the short
    side resized to ``image_size`` (bicubic) and the centre cropped to a square (``do_pad=True``: padded to a
    square with the mean colour first, as the original LLaVA-1.5 code does); ``<image>`` expanded to
    ``(image_size / patch_size)²`` tokens (the CLS token dropped by the ``default`` feature selection)."""
    from transformers import LlavaImageProcessor, LlavaProcessor

    tokenizer = build_tokenizer(renamed={"<|image_pad|>": "<image>"}, chat_template=LLAVA_CHAT_TEMPLATE,
                                image_token="<image>")
    image_processor = LlavaImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_pad=do_pad, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy=vision_feature_select_strategy,
                          num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)


INTERNVL_NAMES = {"<|vision_start|>": "<img>", "<|vision_end|>": "</img>", "<|image_pad|>": "<IMG_CONTEXT>",
                  "<|video_pad|>": "<video>"}


def build_internvl_processor(tile_size: int = 448, image_seq_length: int = 256, *, max_patches: int = 12):
    """InternVL's processor as the -hf checkpoints configure it: ImageNet normalisation, images cut into
    ``tile_size`` tiles (1 to ``max_patches``, the grid closest to the image's aspect ratio) plus a thumbnail,
    ``image_seq_length`` tokens per tile between ``<img>`` and ``</img>``; the tokenizer spells the tiny
    tokenizer's vision ids ``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<video>``."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    tokenizer = build_tokenizer(renamed=INTERNVL_NAMES, chat_template=INTERNVL_CHAT_TEMPLATE,
                                start_image_token="<img>", end_image_token="</img>",
                                context_image_token="<IMG_CONTEXT>", video_token="<video>")
    size = {"height": tile_size, "width": tile_size}
    image_processor = GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=max_patches,
                                            image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), resample=3)
    video_processor = InternVLVideoProcessor(size=size, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    return InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                             image_seq_length=image_seq_length, chat_template=INTERNVL_CHAT_TEMPLATE)


# LLaVA-OneVision's chat format as llava-hf's checkpoints write it: Qwen turns, a user turn's media first (each
# "<image>" / "<video>" then a newline), then its text.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'video' %}<video>\n{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def build_onevision_processor(image_size: int = 384, patch_size: int = 14, *, image_grid_pinpoints=None,
                              vision_aspect_ratio: str = "anyres_max_9"):
    """LLaVA-OneVision's processor as llava-hf configures it: SigLIP normalisation, each image cut into the tiles
    of its best ``image_grid_pinpoints`` resolution after a base view of the whole image (``image_size``
    pixels); ``<image>`` expanded to the base view's ``(image_size / patch_size)²`` tokens plus the unpadded
    mosaic and its row newlines, ``<video>`` to the pooled frames and a newline; the tokenizer spells the tiny
    tokenizer's image and video ids ``<image>`` and ``<video>``."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    tokenizer = build_tokenizer(renamed={"<|image_pad|>": "<image>", "<|video_pad|>": "<video>"},
                                chat_template=ONEVISION_CHAT_TEMPLATE, image_token="<image>", video_token="<video>")
    size = {"height": image_size, "width": image_size}
    pinpoints = image_grid_pinpoints or [[image_size * r, image_size * c] for r in range(1, 7) for c in range(1, 7)]
    image_processor = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=[list(p) for p in pinpoints],
                                                   image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD))
    video_processor = LlavaOnevisionVideoProcessor(size=size, image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD))
    side = image_size // patch_size
    return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=video_processor, num_image_tokens=side * side,
                                   vision_feature_select_strategy="full",
                                   vision_aspect_ratio=vision_aspect_ratio, chat_template=ONEVISION_CHAT_TEMPLATE)


# Gemma 3's chat format as google's -it checkpoints write it (without their <bos>: the tiny tokenizer has none):
# turns between <start_of_turn> / <end_of_turn>, the assistant's role "model", a system turn folded into the first
# user turn, an image as <start_of_image> (the processor expands it to the full image sequence).
GEMMA3_CHAT_TEMPLATE = (
    "{% set system = namespace(text='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set system.text = (message['content'] if message['content'] is string else "
    "message['content'][0]['text']) + '\n\n' %}"
    "{% else %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if loop.index0 <= 1 %}{{ system.text }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}"
    "{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_turn>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

GEMMA3_NAMES = {"<|vision_start|>": "<start_of_image>", "<|vision_end|>": "<end_of_image>",
                "<|image_pad|>": "<image_soft_token>"}


def build_gemma3_processor(image_size: int = 896, image_seq_length: int = 256, *, do_pan_and_scan: bool = False,
                           pan_and_scan_min_crop_size: int = 256):
    """Gemma 3's processor as google's checkpoints configure it: images resized to ``image_size`` squared
    (bilinear, normalised to [-1, 1]), ``<start_of_image>`` expanded to ``\n\n<start_of_image>`` +
    ``image_seq_length`` ``<image_soft_token>`` + ``<end_of_image>\n\n``, pan-and-scan crops (off by default, as
    there) each their own such sequence; the tokenizer spells the tiny tokenizer's vision ids that way."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    tokenizer = build_tokenizer(renamed=GEMMA3_NAMES, chat_template=GEMMA3_CHAT_TEMPLATE,
                                boi_token="<start_of_image>", eoi_token="<end_of_image>",
                                image_token="<image_soft_token>")
    image_processor = Gemma3ImageProcessor(size={"height": image_size, "width": image_size}, resample=2,
                                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                                           do_pan_and_scan=do_pan_and_scan,
                                           pan_and_scan_min_crop_size=pan_and_scan_min_crop_size,
                                           pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=image_seq_length,
                           chat_template=GEMMA3_CHAT_TEMPLATE)


def processor_for_config(config, **kwargs):
    """The tiny processor that fits a tiny model's config (its family, tower size and tokens per image)."""
    model_type = config.model_type
    vc = config.vision_config
    if model_type == "llava":
        return build_llava_processor(vc.image_size, vc.patch_size,
                                     vision_feature_select_strategy=config.vision_feature_select_strategy, **kwargs)
    if model_type == "internvl":
        return build_internvl_processor(vc.image_size[0], config.image_seq_length, **kwargs)
    if model_type in ("qwen3_vl", "qwen3_vl_moe"):
        return build_qwen3_vl_processor(patch_size=vc.patch_size, merge_size=vc.spatial_merge_size, **kwargs)
    if model_type == "llava_onevision":
        return build_onevision_processor(vc.image_size, vc.patch_size, image_grid_pinpoints=config.image_grid_pinpoints,
                                         vision_aspect_ratio=config.vision_aspect_ratio, **kwargs)
    if model_type == "gemma3":
        return build_gemma3_processor(vc.image_size, config.mm_tokens_per_image, **kwargs)
    return build_processor(model_type, **kwargs)
