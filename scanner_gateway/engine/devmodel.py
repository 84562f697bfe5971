"""Build a tiny, seeded, random-weight Qwen3-VL model directory, entirely offline.

The result loads in vLLM exactly like Qwen3-VL-8B (same architecture, chat format,
special tokens and processor), only ~1 M parameters. Its text is nonsense, but vLLM's
structured-output decoding still forces schema-valid JSON, so every layer of the real
serving path runs in tests and on laptops.

Needs torch, transformers and tokenizers (the `engine-cpu` extra); imported lazily so
the gateway itself never depends on them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEV_MODEL_NAME = "scanner-dev-qwen3-vl"
DEFAULT_SEED = 1234
VOCAB_SIZE = 2048

# Qwen2/3 special tokens, in Qwen's order; ids follow the trained BPE vocabulary.
SPECIAL_TOKENS = [
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
]

# Renders OpenAI-style multimodal messages the way Qwen3-VL's template does: each
# image part becomes <|vision_start|><|image_pad|><|vision_end|> in place.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' or 'image' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Words a retail VLM would emit, so the BPE merges look like the domain (zh and en).
_CORPUS_WORDS = (
    "product brand category package bottle can box bag jar carton pack facings count "
    "price currency unit promotion discount shelf gap out of stock misplaced fullness "
    "storefront sign open closed licence kitchen headwear mask gloves raw cooked bin "
    "pest clean pass fail not_visible evidence milk water cola chips rice noodles soap "
    "商品 品牌 价格 货架 缺货 促销 门店 营业 厨房 口罩 手套 生熟 分开 垃圾桶 清洁 "
    '{ } [ ] : , " true false null 0 1 2 3 4 5 6 7 8 9 . - CNY USD EUR ¥ $ € '
)


def _train_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [_CORPUS_WORDS] * 50 + [" ".join(reversed(_CORPUS_WORDS.split()))] * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=32768,
    )


# Shapes by preset. "tiny": the dev model (head_dim 32, the smallest head size vLLM's
# CPU attention backend supports). "qwen3-vl-8b": Qwen3-VL-8B's published shapes, written
# without weights, for `vllm serve --load-format dummy` on a GPU (the bench's 8B runs).
_TEXT_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "max_position_embeddings": 32768,
        "mrope_section": [6, 5, 5],
    },
    "qwen3-vl-8b": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 262144,
        "mrope_section": [24, 20, 20],
    },
}
_VISION_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": 64,
        "deepstack_visual_indexes": [1],
    },
    "qwen3-vl-8b": {
        "depth": 27,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_heads": 16,
        "out_hidden_size": 4096,
        "deepstack_visual_indexes": [8, 16, 24],
    },
}
PRESETS = tuple(_TEXT_SHAPES)


def _model_config(tokenizer: Any, preset: str = "tiny") -> Any:
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    shape = dict(_TEXT_SHAPES[preset])
    mrope_section = shape.pop("mrope_section")
    text = {
        "vocab_size": len(tokenizer),
        **shape,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": mrope_section,
            "mrope_interleaved": True,
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }
    vision = {
        **_VISION_SHAPES[preset],
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 2304,
    }
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def _processor(tokenizer: Any) -> Any:
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
        Qwen3VLVideoProcessor,
    )

    # Qwen3-VL's published processor settings: 16 px patches merged 2x2 (32 px tiles).
    size = {"shortest_edge": 64 * 32 * 32, "longest_edge": 16384 * 32 * 32}
    image = Qwen2VLImageProcessor(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size=size,
    )
    video = Qwen3VLVideoProcessor(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32},
    )
    return Qwen3VLProcessor(
        image_processor=image,
        tokenizer=tokenizer,
        video_processor=video,
        chat_template=CHAT_TEMPLATE,
    )


def build_dev_model(out_dir: Path, seed: int = DEFAULT_SEED, preset: str = "tiny") -> Path:
    """Write the dev model to `out_dir` (created) and return it.

    preset "qwen3-vl-8b" writes Qwen3-VL-8B's shapes with the dev tokenizer and no
    weights: for `vllm serve --load-format dummy` (GPU benchmarks, no download)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; one of {', '.join(PRESETS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = _train_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    config = _model_config(tokenizer, preset)
    if preset != "tiny":
        config.dtype = torch.bfloat16  # as Qwen3-VL-8B ships; vLLM's "auto" dtype reads it
        # Saved without a model, the config names no architecture, and vLLM would load
        # it as a pooling model: name the one it is.
        config.architectures = ["Qwen3VLForConditionalGeneration"]
        return _write_config_only(out_dir, config, tokenizer, preset)
    model = Qwen3VLForConditionalGeneration(config).to(torch.bfloat16)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    _processor(tokenizer).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _write_generation_config(out_dir, config)
    (out_dir / "DEV_MODEL.md").write_text(
        f"# {DEV_MODEL_NAME}\n\nRandom weights (seed {seed}), "
        f"{sum(p.numel() for p in model.parameters()):,} parameters. "
        "Built by `scanner-gateway make-dev-model`; for tests and laptops only.\n"
    )
    return out_dir


def _write_config_only(out_dir: Path, config: Any, tokenizer: Any, preset: str) -> Path:
    config.save_pretrained(out_dir)
    _processor(tokenizer).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _write_generation_config(out_dir, config)
    (out_dir / "DEV_MODEL.md").write_text(
        f"# {DEV_MODEL_NAME} ({preset} shapes, no weights)\n\nServe with `vllm serve DIR "
        "--load-format dummy`; the bench's seed systems initialise random weights from it.\n"
    )
    return out_dir


def _write_generation_config(out_dir: Path, config: Any) -> None:
    # Greedy by default; vLLM is started with --generation-config vllm anyway.
    (out_dir / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": config.text_config.bos_token_id,
                "eos_token_id": [config.text_config.eos_token_id],
                "pad_token_id": config.text_config.pad_token_id,
                "do_sample": False,
            },
            indent=2,
        )
    )


def is_model_dir(path: Path) -> bool:
    return (Path(path) / "config.json").exists() and any(Path(path).glob("*.safetensors"))
