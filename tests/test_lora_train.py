"""Fine-tuning learns, and its adapters interoperate with mlx-lm in both directions."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from support.lora import case_rows, greedy, make_quantized_model_dir, text_rows, write_jsonl

from elm_mlx.lora.config import build_config
from elm_mlx.lora.train import finetune
from elm_spec import ElmError, ModelSpec

pytestmark = pytest.mark.slow  # subprocesses, trained fixtures or servers


def metrics(adapter_path: Path) -> list[dict]:
    return [json.loads(line) for line in (adapter_path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base_dir(make_model_dir) -> Path:
    return make_model_dir(seed=11)


@pytest.fixture(scope="module")
def case_task(base_dir, tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    """LoRA adapters trained on upper-to-lower case mapping of three letters."""
    train, held_out = case_rows()
    data = tmp_path_factory.mktemp("case")
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "valid.jsonl", held_out)
    adapters = data / "adapters"
    config = build_config(None, dict(
        model=str(base_dir), data=str(data), adapter_path=str(adapters), iters=150,
        batch_size=16, learning_rate=1e-3, rank=16, alpha=32.0, warmup=10, steps_per_eval=150,
        steps_per_report=50, val_batches=-1, chat_template="none"))
    return adapters, finetune(config), held_out


def test_lora_learns_a_task_the_base_cannot_do(base_dir, case_task):
    import elm_mlx

    adapters, results, held_out = case_task
    assert results["val_loss"] <= results["initial_val_loss"] / 2
    model, tokenizer = elm_mlx.load(base_dir, adapter_path=adapters)
    base, _ = elm_mlx.load(base_dir)
    correct = base_correct = 0
    for row in held_out:
        prompt = [tokenizer.bos_token_id, *tokenizer.encode(row["prompt"], add_special_tokens=False)]
        answer = [*tokenizer.encode(row["completion"], add_special_tokens=False),
                  tokenizer.eos_token_id]
        correct += greedy(model, prompt, len(answer)) == answer
        base_correct += greedy(base, prompt, len(answer)) == answer
    assert correct >= 0.8 * len(held_out)
    assert base_correct == 0


def test_adapters_load_the_same_in_mlx_lm_and_elm(base_dir, case_task):
    import mlx_lm

    import elm_mlx

    adapters = case_task[0]
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 4
    assert config["lora_parameters"]["keys"] == ["attn.qkv_proj", "attn.out_proj",
                                                 "ffn.proj_1", "ffn.proj_2"]
    ids = mx.array([[1, 40, 300, 269, 285, 419, 461, 2, 77]])
    theirs, _ = mlx_lm.load(str(base_dir), adapter_path=str(adapters))
    ours, _ = elm_mlx.load(base_dir, adapter_path=adapters)
    base, _ = elm_mlx.load(base_dir)
    expected = np.array(theirs(ids))
    np.testing.assert_allclose(np.array(ours(ids)), expected, atol=1e-5, rtol=0)
    assert np.abs(np.array(base(ids)) - expected).max() > 1e-2  # the adapters do something


def test_elm_loads_adapters_written_by_mlx_lm(base_dir, tmp_path):
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import save_config

    import elm_mlx

    model, _ = mlx_lm.load(str(base_dir))
    model.freeze()
    lora_parameters = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    linear_to_lora_layers(model, 2, lora_parameters)
    mx.random.seed(1)
    trained = {name: mx.random.normal(value.shape) * 0.05
               for name, value in tree_flatten(model.trainable_parameters())}
    model.load_weights(list(trained.items()), strict=False)
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), trained)
    save_config({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora_parameters,
                 "model": str(base_dir)}, tmp_path / "adapter_config.json")
    ids = mx.array([[1, 12, 300, 45, 2]])
    ours, _ = elm_mlx.load(base_dir, adapter_path=tmp_path)
    np.testing.assert_allclose(np.array(ours(ids)), np.array(model(ids)), atol=1e-5, rtol=0)


def test_adapters_from_another_base_model_name_the_tensor(make_model_dir, case_task):
    import elm_mlx

    other = make_model_dir(ModelSpec.from_preset("elm-tiny").replace(model_dim=96, head_dim=16))
    with pytest.raises(ElmError, match=r"adapters do not fit this model .*"
                                       r"transformer\.layers\.\d+\..*lora_a: adapter shape"):
        elm_mlx.load(other, adapter_path=case_task[0])


@pytest.mark.parametrize("kind", ["dora", "qlora"])
def test_dora_and_qlora_train_save_and_load(base_dir, tmp_path, kind):
    from mlx.utils import tree_flatten

    import elm_mlx
    from elm_mlx.lora.data import Encoder, batch_stream, load_split
    from elm_mlx.lora.train import evaluate
    from elm_spec.chat_template import resolve_chat_template

    model_dir = base_dir
    if kind == "qlora":
        model_dir = make_quantized_model_dir(base_dir, tmp_path / "quantized")
    write_jsonl(tmp_path / "data" / "train.jsonl", text_rows(64, seed=2))
    write_jsonl(tmp_path / "data" / "valid.jsonl", text_rows(8, seed=3))
    write_jsonl(tmp_path / "data" / "test.jsonl", text_rows(8, seed=4))
    adapters = tmp_path / "adapters"
    config = build_config(None, dict(
        model=str(model_dir), data=str(tmp_path / "data"), adapter_path=str(adapters),
        fine_tune_type="dora" if kind == "dora" else "lora", iters=40, batch_size=4,
        learning_rate=2e-3, steps_per_report=10, max_seq_length=64, num_layers=16, test=True))
    results = finetune(config)
    assert json.loads((adapters / "adapter_config.json").read_text())["num_layers"] == 4
    assert results["test_perplexity"] == pytest.approx(np.exp(results["test_loss"]))
    losses = [m["train_loss"] for m in metrics(adapters) if "train_loss" in m]
    assert losses[-1] < losses[0]
    assert results["val_loss"] < 0.8 * results["initial_val_loss"]
    # Reloaded adapters give the validation loss the run ended with.
    model, tokenizer = elm_mlx.load(model_dir, adapter_path=adapters)
    assert (kind == "qlora") == any("scales" in name for name, _ in tree_flatten(model.parameters()))
    split = load_split(tmp_path / "data" / "valid.jsonl",
                       Encoder(tokenizer, resolve_chat_template(None, None)), 64)
    stream = batch_stream(split, 4, 64, pack=True, seed=0, training=False)
    assert evaluate(model, stream, -1) == pytest.approx(results["val_loss"], abs=1e-5)
    saved = mx.load(str(adapters / "adapters.safetensors"))
    assert any(name.endswith(".m") for name in saved) == (kind == "dora")


def test_fused_model_carries_the_training_chat_template(base_dir, tmp_path):
    from mlx_lm.utils import load_tokenizer

    from elm_mlx.lora.fuse import fuse
    from elm_spec.chat_template import shipped_chat_template

    train, _ = case_rows()
    write_jsonl(tmp_path / "data" / "train.jsonl", train[:8])
    adapters = tmp_path / "adapters"
    finetune(build_config(None, dict(model=str(base_dir), data=str(tmp_path / "data"),
                                     adapter_path=str(adapters), iters=2, batch_size=4)))
    assert json.loads((adapters / "adapter_config.json").read_text())["chat_template"] == \
        shipped_chat_template()
    fused = fuse(base_dir, adapters, tmp_path / "fused")
    tokenizer = load_tokenizer(fused)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "A B"}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompt == "<s><|user|>\nA B</s><|assistant|>\n"


def test_gradient_accumulation_is_one_update_with_the_mean_gradient(base_dir, tmp_path):
    """Two accumulated batches make one AdamW update with the mean of their gradients,
    computed here independently from the same initial adapters and the same two batches."""
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_map

    import elm_mlx
    from elm_mlx.lora.adapters import apply_fine_tune
    from elm_mlx.lora.data import Encoder, batch_stream, load_data_dir
    from elm_mlx.lora.train import batch_arrays, batch_loss

    write_jsonl(tmp_path / "data" / "train.jsonl", text_rows(12, seed=4))
    config = build_config(None, dict(
        model=str(base_dir), data=str(tmp_path / "data"), adapter_path=str(tmp_path / "a"),
        iters=2, batch_size=2, grad_accumulation_steps=2, learning_rate=1e-2,
        lr_schedule="constant", pack=False, max_seq_length=64, save_every=2))
    finetune(config)
    trained = mx.load(str(tmp_path / "a" / "adapters.safetensors"))

    model, tokenizer = elm_mlx.load(base_dir)
    mx.random.seed(config.seed)
    apply_fine_tune(model, config)
    split = load_data_dir(config.data, Encoder(tokenizer, None), config.max_seq_length)["train"]
    stream = batch_stream(split, config.batch_size, config.max_seq_length, False, config.seed,
                          training=True)
    gradients = [nn.value_and_grad(model, batch_loss)(model, *batch_arrays(stream.training_batch(i)))[1]
                 for i in range(2)]
    mean = tree_map(lambda a, b: (a + b) / 2, *gradients)
    before = dict(tree_flatten(model.trainable_parameters()))
    optim.AdamW(learning_rate=config.learning_rate, weight_decay=config.weight_decay).update(model, mean)
    expected = dict(tree_flatten(model.trainable_parameters()))
    assert expected.keys() == trained.keys()
    moved = max(float(mx.abs(expected[k] - before[k]).max()) for k in expected)
    assert moved > 1e-3  # one real update, which the trained adapters must equal
    for key, value in expected.items():
        np.testing.assert_allclose(np.array(trained[key]), np.array(value), atol=1e-6, err_msg=key)


def test_gradient_checkpointing_gives_the_same_adapters(base_dir, tmp_path):
    """`--grad-checkpoint` recomputes activations (lower MLX peak) and changes nothing else.
    Run as commands: mlx-lm's grad_checkpoint patches the block class for the whole process."""
    from support.cli import run_elm

    write_jsonl(tmp_path / "data" / "train.jsonl", text_rows(12, seed=5))
    saved = {}
    for flag in ("--grad-checkpoint", "--no-grad-checkpoint"):
        out = tmp_path / flag
        done = run_elm("finetune", "--lora", "--model", str(base_dir), "--data",
                       str(tmp_path / "data"), "--adapter-path", str(out), "--iters", "3",
                       "--batch-size", "2", "--learning-rate", "1e-2", "--max-seq-length", "64",
                       *([flag] if flag == "--grad-checkpoint" else []))
        assert done.returncode == 0, done.stderr[-2000:]
        saved[flag] = (mx.load(str(out / "adapters.safetensors")),
                       metrics(out)[-1]["peak_memory_gb"])
    (checkpointed, checkpointed_peak), (plain, plain_peak) = saved.values()
    assert checkpointed_peak < 0.9 * plain_peak  # activations were recomputed, not kept
    for key, value in plain.items():
        np.testing.assert_allclose(np.array(checkpointed[key]), np.array(value), atol=1e-6,
                                   err_msg=key)


def test_sequence_length_follows_the_model_and_small_data_sets_train_unpacked(base_dir, tmp_path):
    """32 short rows fill one packed row of the model's 256-token context, fewer than
    --batch-size 2: the run trains them unpacked, as mlx-lm would, instead of refusing."""
    import io

    from rich.console import Console

    from elm_mlx.lora.data import Encoder, load_data_dir, packed_rows

    context = ModelSpec.from_preset("elm-tiny").max_context_length
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": "the model"}] * 32)
    config = build_config(None, dict(model=str(base_dir), data=str(tmp_path / "data"),
                                     adapter_path=str(tmp_path / "a"), iters=4, batch_size=2))
    import elm_mlx

    _, tokenizer = elm_mlx.load(base_dir)
    examples = load_data_dir(config.data, Encoder(tokenizer, None), context)["train"].examples
    assert len(packed_rows(examples, context, config.seed)) < 2  # what packing alone would give

    out = io.StringIO()
    finetune(config, Console(file=out, width=200))
    assert "training unpacked, one example per row" in out.getvalue()
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["max_seq_length"] == context
    assert (tmp_path / "a" / "adapters.safetensors").is_file() and len(metrics(tmp_path / "a")) >= 1

    out = io.StringIO()
    finetune(build_config(None, dict(model=str(base_dir), data=str(tmp_path / "data"),
                                     adapter_path=str(tmp_path / "b"), iters=2, batch_size=2,
                                     max_seq_length=2048)), Console(file=out, width=200))
    assert (f"warning: --max-seq-length 2048 is beyond the model's context of {context} tokens"
            in out.getvalue())
