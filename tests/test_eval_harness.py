"""lm-eval-harness runs local task files end to end through the `elm` model, on both backends:
multiple choice (its own copies of the seven task YAMLs, pointed at local JSONL), rolling
log-likelihood and generate_until with stop strings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from support.cli import REPO
from support.corpora import stdlib_texts
from support.eval_tasks import write_task_files

from elm_eval.backend import load_eval_model
from elm_eval.perplexity import evaluate_perplexity, read_documents
from elm_eval.tasks import TASKS, evaluate_tasks, load_tasks, task_loglikelihoods
from elm_spec import ModelSpec

pytestmark = pytest.mark.slow  # subprocesses, trained fixtures or servers

LM_EVAL_YAMLS = {
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml", "sciq": "sciq/sciq.yaml",
    "winogrande": "winogrande/default.yaml", "boolq": "super_glue/boolq/default.yaml",
}
ROWS = 3


def _local_task_yaml(name: str, data_file: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    validation: {data_file}\n"
            "training_split: null\nvalidation_split: validation\ntest_split: null\n" + body)


@pytest.fixture(scope="module")
def harness_setup(make_model_dir, tmp_path_factory, monkeypatch_module):
    import lm_eval.tasks

    root = tmp_path_factory.mktemp("harness")
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch_module.setenv("HF_DATASETS_CACHE", str(root / "datasets-cache"))
    data = write_task_files(root / "data", ROWS)
    yamls = root / "yaml"
    yamls.mkdir()
    builtin = Path(lm_eval.tasks.__file__).parent
    for task, relative in LM_EVAL_YAMLS.items():
        (yamls / f"{task}.yaml").write_text(
            f"include: {builtin / relative}\ntag: []\n"
            + _local_task_yaml(f"local_{task}", data / f"{task}.jsonl", ""))
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t[:150]}) + "\n" for t in stdlib_texts(2)))
    (yamls / "rolling.yaml").write_text(_local_task_yaml("local_rolling", texts, (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n")))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n"
                               for p in ("def main(", "class A:\n    ")))
    (yamls / "generate.yaml").write_text(_local_task_yaml("local_generate", prompts, (
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: [\"\\n\", \"(\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")))
    model_dir = make_model_dir(ModelSpec.from_preset("elm-tiny"), seed=5)
    return model_dir, data, yamls, texts, prompts


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _run_harness(backend: str, model_dir: Path, yamls: Path, names: list[str], output: Path,
                 monkeypatch) -> tuple[dict, dict[str, list[dict]]]:
    """(results, samples by task): torch through lm_eval.simple_evaluate, mlx through
    `elm eval harness` (lm-eval's own command line, run in this process)."""
    model_args = f"pretrained={model_dir},backend={backend}"
    if backend == "torch":
        import lm_eval
        from lm_eval.tasks import TaskManager

        import elm_eval.harness  # noqa: F401  (registers the model)

        run = lm_eval.simple_evaluate(model="elm", model_args=model_args, tasks=names,
                                      task_manager=TaskManager(include_path=str(yamls),
                                                               include_defaults=False),
                                      log_samples=True, batch_size=4)
        return run["results"], run["samples"]
    import lm_eval.tasks

    from apps.cli import main

    class LocalTasksOnly(lm_eval.tasks.TaskManager):
        """lm-eval's command line indexes its thousands of built-in task files (tens of
        seconds here); these tests need only the local YAMLs, which include what they use."""

        def __init__(self, *args, include_defaults: bool = False, **kwargs):
            super().__init__(*args, include_defaults=include_defaults, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasksOnly)
    monkeypatch.setattr("sys.argv", ["elm"])
    with pytest.raises(SystemExit) as exited:
        main(["eval", "harness", "--model", "elm", "--model_args", model_args, "--tasks",
              ",".join(names), "--include_path", str(yamls), "--log_samples",
              "--output_path", str(output), "--batch_size", "4"])
    assert exited.value.code in (0, None)
    (results_file,) = output.rglob("results_*.json")
    samples = {name: [json.loads(line) for file in output.rglob(f"samples_{name}_*.jsonl")
                      for line in file.read_text().splitlines()] for name in names}
    return json.loads(results_file.read_text())["results"], samples


def hf_bits_per_byte(model, documents: list[str]) -> float:
    """Bits per byte as lm-eval's `hf` model scores rolling documents by default: BOS, then the
    document, each token conditioned on what precedes it after a BOS prefix."""
    scores = model.loglikelihood_rolling([model.tokenizer.encode(d, bos=True) for d in documents],
                                         model.tokenizer.bos_id)
    return -sum(s.logprob for s in scores) / math.log(2) / sum(len(d.encode()) for d in documents)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_lm_eval_runs_local_tasks_through_elm(backend, harness_setup, tmp_path, monkeypatch):
    model_dir, data, yamls, texts, _ = harness_setup
    names = [f"local_{task}" for task in TASKS] + ["local_rolling", "local_generate"]
    results, samples = _run_harness(backend, model_dir, yamls, names, tmp_path / "out", monkeypatch)

    # Multiple choice: lm-eval's own prompts give exactly the log-likelihoods `elm eval tasks`
    # computes from its readers, and so the same metrics.
    ours = load_eval_model(model_dir, backend=backend)
    questions = load_tasks(list(TASKS), data)
    for task in TASKS:
        rows = sorted(samples[f"local_{task}"], key=lambda s: s["doc_id"])
        theirs = [float(resp[0][0]) for row in rows for resp in row["resps"]]
        assert theirs == pytest.approx(task_loglikelihoods(ours, questions[task]), abs=1e-4)
        assert results[f"local_{task}"]["acc,none"] == evaluate_tasks(
            ours, {task: questions[task]})[task]["acc"]

    # Rolling log-likelihood: lm-eval's `hf` convention (BOS, then the document, scored after a
    # BOS prefix), in bits per byte of the whole text.
    documents = read_documents([texts])
    expected = hf_bits_per_byte(ours, documents)
    assert results["local_rolling"]["bits_per_byte,none"] == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(evaluate_perplexity(ours, documents)["bits_per_byte"], rel=1e-5)

    # generate_until: the greedy continuation (up to 8 tokens or end of sequence), cut
    # before the first stop string.
    eos = ours.tokenizer.eos_id
    assert len(samples["local_generate"]) == 2
    for row in samples["local_generate"]:
        prompt = ours.tokenizer.encode(row["doc"]["prompt"], bos=True)
        tokens = list(ours.greedy_tokens(prompt, 8))
        tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
        expected = ours.tokenizer.decode(tokens)
        cuts = [expected.find(stop) for stop in ("\n", "(") if stop in expected]
        assert row["resps"][0][0] == (expected[: min(cuts)] if cuts else expected)


def test_documented_one_line_lm_eval_command_finds_the_elm_model(harness_setup, tmp_path):
    """docs/eval.md's `python -c` line in a fresh interpreter runs lm-eval's own command line
    with `--model elm`; and nothing of elm hooks a plain interpreter (no `.pth` import hook)."""
    import os
    import subprocess
    import sys

    plain = subprocess.run([sys.executable, "-c", "import sys; print(sorted(type(f).__module__ "
                            "for f in sys.meta_path))"], capture_output=True, text=True, check=True,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert "elm" not in plain.stdout, plain.stdout
    one_line = next(line for line in (REPO / "docs" / "eval.md").read_text().splitlines()
                    if line.startswith('python -c "import sys, elm_eval.harness'))
    code = one_line.split('"')[1]
    model_dir, _, yamls, texts, _ = harness_setup
    rolling_only = tmp_path / "yaml"
    rolling_only.mkdir()
    (rolling_only / "rolling.yaml").write_text((yamls / "rolling.yaml").read_text())
    output = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code, "--model", "elm", "--model_args",
         f"pretrained={model_dir},backend=mlx", "--tasks", "local_rolling",
         "--include_path", str(rolling_only), "--output_path", str(output)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (results_file,) = output.rglob("results_*.json")
    got = json.loads(results_file.read_text())["results"]["local_rolling"]["bits_per_byte,none"]
    expected = hf_bits_per_byte(load_eval_model(model_dir, backend="mlx"), read_documents([texts]))
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("add_bos_token", [True, False, None])
def test_elm_model_scores_as_lm_eval_hf_model_does(add_bos_token, harness_setup):
    """lm-eval's own `hf` model running the same weights (an elm PyTorch model presented as a
    transformers model) gives the same rolling and conditional log-likelihoods as `--model elm`,
    for each add_bos_token setting (None: `hf`'s default, the tokenizer's own BOS)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from support.hf_wrapper import wrap_for_transformers

    from elm_eval.harness import ElmLM

    model_dir, _, _, _, _ = harness_setup
    bos_arg = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    hf = HFLM(pretrained=wrap_for_transformers(model_dir), tokenizer=str(model_dir),
              backend="causal", batch_size=1, max_length=48, **bos_arg)
    ours = ElmLM(pretrained=str(model_dir), backend="torch", max_length=48, **bos_arg)
    documents = [text[:300] for text in stdlib_texts(3)] + [" leading space", "<s>starts with bos"]
    rolling = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(documents)]
    theirs = hf.loglikelihood_rolling(rolling, disable_tqdm=True)
    assert ours.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(theirs, abs=1e-3)
    pairs = [Instance("loglikelihood", {}, (c, x), i)
             for i, (c, x) in enumerate([("def main(", "):"), ("", " import os"), ("a ", " b")])]
    expected = [lp for lp, _ in hf.loglikelihood(pairs, disable_tqdm=True)]
    assert [lp for lp, _ in ours.loglikelihood(pairs, disable_tqdm=True)] == pytest.approx(expected, abs=1e-3)


def test_harness_task_whose_data_set_is_out_of_reach_is_one_line(harness_setup, tmp_path):
    """Offline, a stock lm-eval task (its data set on the Hub, not in the cache) gets one line
    saying how to fill the cache or score the task from local files, not a traceback."""
    from support.cli import one_line_failure, run_elm

    model_dir = harness_setup[0]
    result = run_elm("eval", "harness", "--model", "elm", "--model_args",
                     f"pretrained={model_dir},backend=torch", "--tasks", "arc_easy",
                     env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                          "HF_DATASETS_CACHE": str(tmp_path / "empty-cache")})
    one_line_failure(result, "lm-eval cannot fetch a task's data set", "allenai/ai2_arc",
                     "elm eval tasks --data-dir DIR")
