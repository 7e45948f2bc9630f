"""`elm eval`: log-likelihoods against the logits, torch/MLX agreement, sliding-window perplexity,
quantized and adapter models, and bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from support.cli import run_elm
from support.corpora import stdlib_texts
from support.eval_tasks import write_quantized_dir, write_task_files

from elm_eval.backend import load_eval_model
from elm_eval.model import rolling_windows
from elm_eval.perplexity import evaluate_perplexity, read_documents
from elm_eval.tasks import (
    TASKS,
    encode_pair,
    evaluate_tasks,
    load_tasks,
    score_questions,
    task_loglikelihoods,
)
from elm_spec import ElmError, ModelSpec


def log_softmax_pick(logits: np.ndarray, targets: list[int]) -> tuple[float, bool]:
    """Sum of log-softmax(logits)[target] in float64, by hand, and whether all are argmax."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    picked = logprobs[np.arange(len(targets)), targets]
    return float(picked.sum()), bool((logits.argmax(axis=-1) == np.array(targets)).all())


def reference_logits(backend: str, model_dir: Path, adapter_path: Path | None = None):
    """logits(ids) -> np.ndarray [seq, vocab] straight from the twin's forward pass."""
    if backend == "torch":
        import torch

        from elm_train import load_model

        model = load_model(model_dir)
        return lambda ids: model(torch.tensor([ids]))[0].detach().double().numpy()
    import mlx.core as mx

    from elm_mlx import load

    model, _ = load(model_dir, adapter_path=adapter_path)
    return lambda ids: np.array(model(mx.array([ids]))[0].astype(mx.float32))


def reference_loglikelihood(logits_of, context: list[int], continuation: list[int],
                            max_length: int) -> tuple[float, bool]:
    tokens = (context + continuation)[-(max_length + 1):]
    logits = logits_of(tokens[:-1])
    return log_softmax_pick(logits[len(tokens) - 1 - len(continuation):], continuation)


@pytest.fixture(scope="module")
def model_dir(make_model_dir) -> Path:
    return make_model_dir(ModelSpec.from_preset("elm-tiny"), seed=3)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_task_files(tmp_path_factory.mktemp("tasks"))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_loglikelihoods_equal_log_softmax_of_the_logits(backend, model_dir, task_dir):
    # A short context (24) forces lm-eval's left truncation on the longer requests.
    for max_length in (256, 24):
        model = load_eval_model(model_dir, backend=backend, batch_size=5, max_length=max_length)
        questions = load_tasks(["hellaswag", "winogrande", "sciq"], task_dir, limit=2)
        requests = [encode_pair(model.tokenizer, context, continuation, add_bos=True)
                    for qs in questions.values() for q in qs for context, continuation in q.requests]
        got = model.loglikelihood(requests)
        logits_of = reference_logits(backend, model_dir)
        for (context, continuation), (logprob, greedy) in zip(requests, got, strict=True):
            want, want_greedy = reference_loglikelihood(logits_of, context, continuation, max_length)
            assert logprob == pytest.approx(want, abs=1e-4)
            assert greedy == want_greedy
        assert any(len(c) + len(t) > 25 for c, t in requests)  # truncation was exercised


def test_torch_and_mlx_agree_on_task_accuracy(model_dir, task_dir):
    questions = load_tasks(list(TASKS), task_dir, limit=4)
    results, lls = {}, {}
    for backend in ("torch", "mlx"):
        model = load_eval_model(model_dir, backend=backend)
        lls[backend] = {task: task_loglikelihoods(model, qs) for task, qs in questions.items()}
        results[backend] = {task: score_questions(qs, lls[backend][task], TASKS[task].metrics)
                            for task, qs in questions.items()}
    assert results["torch"] == results["mlx"]
    assert "acc_norm" in results["torch"]["hellaswag"] and "acc_norm" not in results["torch"]["boolq"]
    for task in TASKS:
        np.testing.assert_allclose(lls["torch"][task], lls["mlx"][task], atol=1e-4)


def test_rolling_windows_are_lm_evals(model_dir):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(10, 47))
    for max_length in (1, 5, 8, 37, 50):
        for stride in sorted({1, 2, 3, max_length}):
            if stride > max_length:
                continue
            theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(
                tokens, 1, max_length, max_length - stride + 1)]
            ours = list(rolling_windows(tokens, 1, max_length, stride))
            assert [(c + p, len(c)) for c, p in theirs] == ours


def test_perplexity_equals_direct_computation(model_dir):
    texts = [t[:120] for t in stdlib_texts(3)]
    model = load_eval_model(model_dir, backend="torch", batch_size=3)
    logits_of = reference_logits("torch", model_dir)
    encoded = [model.tokenizer.encode(t) for t in texts]
    num_bytes = sum(len(t.encode()) for t in texts)

    # Short texts in one window: one forward over BOS + text.
    nll = -sum(log_softmax_pick(logits_of([1, *ids[:-1]]), ids)[0] for ids in encoded)
    tokens = sum(len(ids) for ids in encoded)
    result = evaluate_perplexity(model, texts)
    assert result["tokens"] == tokens and result["bytes"] == num_bytes
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / (num_bytes * math.log(2)), rel=1e-5)

    # Sliding windows of 16 tokens, stride 5: each token scored alone from the context that
    # lm-eval's rolling windows give it.
    from lm_eval.utils import get_rolling_token_windows

    windowed = load_eval_model(model_dir, backend="torch", batch_size=4, max_length=16)
    texts, encoded = texts[:2], encoded[:2]
    tokens = sum(len(ids) for ids in encoded)
    assert all(len(ids) > 16 for ids in encoded)
    nll = 0.0
    for ids in encoded:
        for inputs, predicted in get_rolling_token_windows(ids, 1, 16, 16 - 5 + 1):
            for k in range(len(predicted)):
                prefix = inputs[: len(inputs) - len(predicted) + k + 1]
                nll -= log_softmax_pick(logits_of(prefix)[-1:], [predicted[k]])[0]
    result = evaluate_perplexity(windowed, texts, stride=5)
    assert result["tokens"] == tokens
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert result["stride"] == 5 and result["context_length"] == 16


def test_quantized_and_adapter_models_on_mlx(model_dir, task_dir, tmp_path):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from elm_mlx import load_model

    quantized = write_quantized_dir(model_dir, tmp_path / "q4")
    assert json.loads((quantized / "config.json").read_text())["quantization"]["bits"] == 4
    questions = load_tasks(["piqa"], task_dir)["piqa"]

    model = load_eval_model(quantized, backend="mlx")
    logits_of = reference_logits("mlx", quantized)
    for context, continuation in [encode_pair(model.tokenizer, c, t, True)
                                  for c, t in questions[0].requests]:
        (got, _), = model.loglikelihood([(context, continuation)])
        assert got == pytest.approx(reference_loglikelihood(logits_of, context, continuation,
                                                            256)[0], abs=1e-4)
    with pytest.raises(ElmError, match="quantized MLX directory: evaluate it as it is with "
                                       "--backend mlx"):
        load_eval_model(quantized, backend="torch")
    assert load_eval_model(quantized).backend == "mlx"  # chosen for it, whatever the platform

    # LoRA adapters with a non-zero update, saved as mlx-lm does.
    lora = load_model(model_dir)
    lora.freeze()
    parameters = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    linear_to_lora_layers(lora, 4, parameters)
    adapters = {name: mx.random.normal(value.shape, key=mx.random.key(i)) * 0.05
                for i, (name, value) in enumerate(tree_flatten(lora.trainable_parameters()))}
    adapter_dir = tmp_path / "adapters"
    adapter_dir.mkdir()
    mx.save_safetensors(str(adapter_dir / "adapters.safetensors"), adapters)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 4, "lora_parameters": parameters}))
    base = task_loglikelihoods(load_eval_model(model_dir, backend="mlx"), questions)
    tuned_model = load_eval_model(model_dir, backend="mlx", adapter_path=adapter_dir)
    tuned = task_loglikelihoods(tuned_model, questions)
    logits_of = reference_logits("mlx", model_dir, adapter_path=adapter_dir)
    first = encode_pair(tuned_model.tokenizer, *questions[0].requests[0], True)
    assert tuned[0] == pytest.approx(reference_loglikelihood(logits_of, *first, 256)[0], abs=1e-4)
    assert not np.allclose(base, tuned, atol=1e-3)
    with pytest.raises(ElmError, match="adapters need the mlx backend"):
        load_eval_model(model_dir, backend="torch", adapter_path=adapter_dir)


@pytest.mark.slow
def test_cli_perplexity_json_and_tasks_output(model_dir, task_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    texts = [t[:200] for t in stdlib_texts(2)]
    data.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    result = run_elm("eval", "perplexity", "--model", str(model_dir), "--data", str(data),
                     "--text-key", "body", "--backend", "torch", "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    direct = evaluate_perplexity(load_eval_model(model_dir, backend="torch"), texts)
    assert printed["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
    assert printed["tokens"] == direct["tokens"]
    assert printed["bits_per_byte"] == pytest.approx(direct["bits_per_byte"], rel=1e-6)

    output = tmp_path / "results.json"
    result = run_elm("eval", "tasks", "--model", str(model_dir), "--tasks", "arc_easy,boolq",
                     "--data-dir", str(task_dir), "--backend", "mlx", "--output", str(output))
    assert result.returncode == 0, result.stderr
    written = json.loads(output.read_text())
    expected = evaluate_tasks(load_eval_model(model_dir, backend="mlx"),
                              load_tasks(["arc_easy", "boolq"], task_dir))
    assert written["results"] == expected
    assert f"| arc_easy | acc_norm | {expected['arc_easy']['acc_norm']:.4f} |" in result.stdout


def test_bad_inputs_fail_with_one_clear_line(model_dir, task_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    lines = (task_dir / "piqa.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    del row["sol2"]
    lines[2] = json.dumps(row)
    (broken / "piqa.jsonl").write_text("\n".join(lines) + "\n")
    result = run_elm("eval", "tasks", "--model", str(model_dir), "--tasks", "piqa",
                     "--data-dir", str(broken))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: {broken / 'piqa.jsonl'} line 3: missing field "
                                     "'sol2' (task piqa)")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = run_elm("eval", "perplexity", "--model", str(model_dir), "--data", str(empty))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {empty}: no rows (the file is empty)"

    untokenized = tmp_path / "untokenized"
    untokenized.mkdir()
    for name in ("config.json", "model.safetensors"):
        (untokenized / name).symlink_to(model_dir / name)
    text = tmp_path / "doc.txt"
    text.write_text("def f(x):\n    return x\n")
    result = run_elm("eval", "perplexity", "--model", str(untokenized), "--data", str(text))
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"error: {untokenized}: no tokenizer (tokenizer.model")
    assert len(result.stderr.strip().splitlines()) == 1

    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\n")
    with pytest.raises(ElmError, match=f"{blank}: no text to evaluate"):
        read_documents([blank])
    with pytest.raises(ElmError, match=r"line 1: missing field 'text' \(--text-key\)"):
        read_documents([task_dir / "piqa.jsonl"])


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_generate_until_cuts_before_the_first_stop_string(backend, model_dir):
    model = load_eval_model(model_dir, backend=backend)
    prompt = model.tokenizer.encode("def main():\n    return", bos=True)
    tokens = list(model.greedy_tokens(prompt, 10))
    # The greedy continuation computed independently: argmax of the twin's logits, step by step.
    logits_of = reference_logits(backend, model_dir)
    ids = list(prompt)
    for token in tokens:
        assert token == int(logits_of(ids)[-1].argmax())
        ids.append(token)
    eos = model.tokenizer.eos_id
    full = model.tokenizer.decode(tokens[: tokens.index(eos)] if eos in tokens else tokens)
    assert len(full) >= 4
    stop = full[2:4]
    assert model.generate_until(prompt, ["never there", stop], 10) == full[: full.index(stop)]
    assert model.generate_until(prompt, [], 10) == full
    assert model.generate_until(prompt, [stop], 0) == ""
