import json

import pytest
from transformers import AutoProcessor

from scanner_gateway.engine.devmodel import SPECIAL_TOKENS, build_dev_model


def test_dev_model_is_a_tiny_seeded_qwen3_vl(tmp_path):
    out = build_dev_model(tmp_path / "a", seed=7)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert config["vision_config"]["patch_size"] == 16 and config["vision_config"]["spatial_merge_size"] == 2
    weights = (out / "model.safetensors").stat().st_size
    assert weights < 8 * 1024 * 1024  # a few MB

    processor = AutoProcessor.from_pretrained(out)
    tok = processor.tokenizer
    for token in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(token) != tok.unk_token_id
    assert config["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")

    messages = [
        {"role": "system", "content": "scan"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "list products"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nscan<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>list products<|im_end|>\n"
                    "<|im_start|>assistant\n")

    again = build_dev_model(tmp_path / "b", seed=7)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_8b_preset_writes_qwen3_vl_8b_shapes_without_weights(tmp_path):
    out = build_dev_model(tmp_path / "8b", preset="qwen3-vl-8b")
    config = json.loads((out / "config.json").read_text())
    # Without it vLLM serves the directory as a pooling model (seen on an H200).
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    text, vision = config["text_config"], config["vision_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_key_value_heads"], text["vocab_size"]) == (
        4096, 36, 8, 151936)
    assert (vision["depth"], vision["hidden_size"], vision["out_hidden_size"]) == (27, 1152, 4096)
    assert text["rope_parameters"]["mrope_section"] == [24, 20, 20] and "mrope_section" not in text
    assert config["dtype"] == "bfloat16"
    assert not list(out.glob("*.safetensors"))  # shapes only: `vllm serve --load-format dummy`
    tok = AutoProcessor.from_pretrained(out).tokenizer
    assert config["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="qwen3-vl-8b"):
        build_dev_model(tmp_path / "x", preset="70b")
