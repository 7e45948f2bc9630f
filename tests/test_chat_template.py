"""One chat-template rule: --chat-template, then the adapters' recorded one, then the model's."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.chat import adapter_dir, random_adapters, with_template

from elm_spec import ElmError
from elm_spec.chat_template import chat_template_for

MODEL_TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
ADAPTER_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def model_dir(make_model_dir) -> Path:
    return make_model_dir()


def test_the_rule_in_order(model_dir, tmp_path):
    templated = with_template(model_dir, tmp_path / "templated", MODEL_TEMPLATE)
    trained = adapter_dir(tmp_path / "trained", ADAPTER_TEMPLATE)
    plain = adapter_dir(tmp_path / "plain", None)
    override = tmp_path / "override.jinja"
    override.write_text("{{ messages[0]['content'] }}\n")

    assert chat_template_for(model_dir) is None
    assert chat_template_for(templated) == MODEL_TEMPLATE
    assert chat_template_for(templated, plain) == MODEL_TEMPLATE
    assert chat_template_for(templated, trained) == ADAPTER_TEMPLATE
    assert chat_template_for(model_dir, trained) == ADAPTER_TEMPLATE
    assert chat_template_for(templated, trained, str(override)) == "{{ messages[0]['content'] }}"
    assert chat_template_for(templated, trained, "none") is None
    with pytest.raises(ElmError, match=r"--chat-template missing.jinja: file not found"):
        chat_template_for(model_dir, None, "missing.jinja")


def test_load_renders_with_the_adapters_template(model_dir, tmp_path):
    """elm_mlx.load gives the tokenizer the rule's template, so every command renders alike."""
    import elm_mlx
    from elm_mlx.generate import encode_prompt

    templated = with_template(model_dir, tmp_path / "templated", MODEL_TEMPLATE)
    adapters = random_adapters(templated, tmp_path / "adapters", ADAPTER_TEMPLATE)
    _, tokenizer = elm_mlx.load(templated, adapter_path=adapters)
    expected = tokenizer.encode("<s><|user|>\nA B</s><|assistant|>\n", add_special_tokens=False)
    assert encode_prompt(tokenizer, "A B") == expected
    assert expected[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in expected
    _, own = elm_mlx.load(templated)
    assert encode_prompt(own, "A B") == own.encode("<s>[user] A B", add_special_tokens=False)
    _, raw = elm_mlx.load(templated, adapter_path=adapters, chat_template="none")
    assert not raw.has_chat_template
    assert encode_prompt(raw, "A B") == raw.encode("A B")
    with pytest.raises(ElmError, match=r"no chat template .* --chat-template FILE"):
        encode_prompt(raw, "A B", use_chat_template=True)


def test_fuse_writes_the_adapters_template_over_the_models(model_dir, tmp_path):
    from elm_mlx.lora.fuse import fuse
    from elm_spec.chat_template import model_template

    templated = with_template(model_dir, tmp_path / "templated", MODEL_TEMPLATE)
    adapters = random_adapters(templated, tmp_path / "adapters", ADAPTER_TEMPLATE)
    fused = fuse(templated, adapters, tmp_path / "fused")
    assert model_template(fused) == ADAPTER_TEMPLATE
