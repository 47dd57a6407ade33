"""A small fast tokenizer with Qwen-VL's special tokens and chat format, and a real Qwen-VL processor
around it (tiny checkpoints with random weights are :func:`ivcprune.models.save_tiny_checkpoint`'s).

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


def build_tokenizer(merges: list[tuple[str, str]] | None = None, vocab_extra: dict[str, int] | None = None):
    """Byte-level BPE tokenizer (256 byte tokens, optional merges) plus Qwen-VL's special tokens."""
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
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
        chat_template=CHAT_TEMPLATE,
    )
    assert tok.convert_tokens_to_ids("<|image_pad|>") == TOKEN_IDS["image_token_id"]
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
