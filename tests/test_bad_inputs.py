"""Bad input to every command: exit status 1 (2 for a malformed flag), one `error:` line that
names the file, key or flag at fault, and every file that was there before left byte for byte."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from apps.cli import main
from elm_spec import ElmError, ModelSpec

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ROOT (hidden temporaries included) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def rejects(capsys: pytest.CaptureFixture[str], root: Path, args: list[str], mentions: str,
            code: int = 1) -> str:
    """`elm ARGS` exits CODE with one error line containing MENTIONS; nothing under ROOT changed."""
    before = snapshot(root)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == code, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert mentions in errors[0], errors[0]
    assert snapshot(root) == before, "files were changed or left behind"
    return errors[0]


# ----- inputs ---------------------------------------------------------------------------------
def edit_header(model_dir: Path, change: Callable[[dict], None]) -> None:
    """Rewrite the safetensors header of MODEL_DIR's weights through CHANGE."""
    file = model_dir / "model.safetensors"
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])


def edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def unknown_dtype(header: dict) -> None:
    header["transformer.norm.weight"]["dtype"] = "F99"


def negative_offset(header: dict) -> None:
    entry = header["transformer.norm.weight"]
    start, end = entry["data_offsets"]
    entry["data_offsets"] = [-4, end - start - 4]


def index_without_shards(model_dir: Path) -> None:
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"transformer.norm.weight": "model-00001-of-00002.safetensors"}}))


def nan_weights(model_dir: Path) -> None:
    weights = load_file(model_dir / "model.safetensors")
    weights["transformer.norm.weight"][:] = float("nan")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})


MODEL_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "unknown dtype": (lambda d: edit_header(d, unknown_dtype), "unknown dtype 'F99'"),
    "negative data offset": (lambda d: edit_header(d, negative_offset), "data offsets -4"),
    "index without local shards": (index_without_shards, "listed in model.safetensors.index.json"),
    "corrupt tokenizer": (lambda d: (d / "tokenizer.json").write_text("{oops"), "tokenizer.json"),
    "config.json unknown key": (lambda d: edit_config(d, colour=1), "config.json: unknown key 'colour'"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{oops"),
                             "config.json: not valid JSON"),
    "config.json vocab 0": (lambda d: edit_config(d, vocab_size=0), "config.json: invalid model spec"),
}


@pytest.fixture(scope="module")
def base_model(make_model_dir) -> Path:
    return make_model_dir(ModelSpec.from_preset("elm-tiny"), seed=5)


@pytest.fixture()
def work(tmp_path: Path, base_model: Path) -> Path:
    """TMP/model (a copy), TMP/data (fine-tuning JSONL), TMP/out (an earlier output), TMP/a-file."""
    shutil.copytree(base_model, tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": f"def function_{i}(value):\n    return value * {i}\n" * 4} for i in range(12)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("an earlier output lives here")
    (tmp_path / "a-file").write_text("not a directory")
    return tmp_path


# ----- generate: sampling flags, shared with every command that samples ------------------------
SAMPLING = [
    (["--temp", "-1"], "--temp"), (["--temp", "nan"], "--temp"), (["--top-p", "2"], "--top-p"),
    (["--top-p", "0"], "--top-p"), (["--top-k", "-1"], "--top-k"), (["--min-p", "1.5"], "--min-p"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--repetition-context-size", "0"], "--repetition-context-size"),
    (["--prefill-step-size", "0"], "--prefill-step-size"), (["--max-tokens", "0"], "--max-tokens"),
    (["--max-kv-size", "2"], "--max-kv-size"),
]


@pytest.mark.parametrize(("flags", "mentions"), SAMPLING, ids=[" ".join(f) for f, _ in SAMPLING])
def test_generate_sampling_flags(work: Path, capsys, flags: list[str], mentions: str) -> None:
    rejects(capsys, work, ["generate", "--model", str(work / "model"), "-p", "hi", *flags], mentions)


def test_sampling_checked_in_the_library_too(base_model: Path) -> None:
    from elm_mlx import load
    from elm_mlx.generate import generate

    model, tokenizer = load(base_model)
    with pytest.raises(ElmError, match="--top-p"):
        generate(model, tokenizer, "hi", top_p=2.0)


@pytest.mark.parametrize("damage", MODEL_DAMAGE)
def test_generate_damaged_model(work: Path, capsys, damage: str) -> None:
    change, mentions = MODEL_DAMAGE[damage]
    change(work / "model")
    rejects(capsys, work, ["generate", "--model", str(work / "model"), "-p", "hi"], mentions)


def test_model_given_as_file(work: Path, capsys) -> None:
    line = rejects(capsys, work, ["generate", "--model", str(work / "a-file"), "-p", "hi"], "a-file")
    assert "it is a file" in line and "does not exist" not in line


# ----- finetune -----------------------------------------------------------------------------
FINETUNE = [
    (["--learning-rate", "-1"], "--learning-rate"), (["--learning-rate", "nan"], "--learning-rate"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--warmup", "-3"], "--warmup"),
    (["--num-layers", "0"], "--num-layers"), (["--num-layers", "-2"], "--num-layers"),
    (["--val-batches", "0"], "--val-batches"), (["--dropout", "nan"], "--dropout"),
    (["--iters", "abc"], "--iters"),
    (["--dpo", "--orpo"], "--dpo and --orpo exclude each other"),
    (["--dpo", "--beta", "0"], "--beta must be a positive number"),
    (["--orpo", "--ref-model", "x"], "--ref-model: --orpo uses no reference model"),
    (["--ipo"], "--ipo: it needs --dpo"),
]


def finetune_args(work: Path, *extra: str, adapters: Path | None = None) -> list[str]:
    return ["finetune", "--lora", "--model", str(work / "model"), "--data", str(work / "data"),
            "--adapter-path", str(adapters or work / "out" / "adapters"), "--iters", "2",
            "--batch-size", "2",
            "--max-seq-length", "64", "--steps-per-eval", "100", "--val-batches", "1", *extra]


@pytest.mark.parametrize(("flags", "mentions"), FINETUNE, ids=[" ".join(f) for f, _ in FINETUNE])
def test_finetune_flags(work: Path, capsys, flags: list[str], mentions: str) -> None:
    code = 2 if "abc" in flags else 1
    rejects(capsys, work, finetune_args(work, *flags), mentions, code=code)


@pytest.mark.parametrize(("content", "mentions"), [
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "train.jsonl:2: not UTF-8 text (byte 0xe9"),
    (b'{"text": "fine"}\n{"text": "cut sh', "train.jsonl:2: not valid JSON (Unterminated string"),
], ids=["not utf-8", "truncated"])
def test_finetune_bad_train_jsonl(work: Path, capsys, content: bytes, mentions: str) -> None:
    (work / "data" / "train.jsonl").write_bytes(content)
    line = rejects(capsys, work, finetune_args(work), mentions)
    if b"cut sh" in content:
        assert "at column 10" in line and "truncated" in line


@pytest.mark.parametrize(("row", "mentions"), [
    ({"text": "an SFT row"}, 'train.jsonl:1: missing "chosen"'),
    ({"prompt": "A", "chosen": "a", "rejected": ["b"]}, "train.jsonl:1: rejected[0] needs a role"),
], ids=["sft row", "bad message"])
def test_finetune_dpo_bad_pairs(work: Path, capsys, row: dict, mentions: str) -> None:
    (work / "data" / "train.jsonl").write_text(json.dumps(row) + "\n")
    rejects(capsys, work, finetune_args(work, "--dpo"), mentions)


def test_finetune_data_given_as_file(work: Path, capsys) -> None:
    args = finetune_args(work)
    args[args.index("--data") + 1] = str(work / "a-file")
    rejects(capsys, work, args, "a-file: is a file, not a directory")


def test_finetune_stops_on_nan_loss(work: Path, capsys) -> None:
    """NaN weights train on NaN: the run stops at step 1 without writing adapters."""
    nan_weights(work / "model")
    with pytest.raises(SystemExit) as exit_info:
        main(finetune_args(work))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "step 1: the training loss is nan" in err
    assert not (work / "out" / "adapters" / "adapters.safetensors").exists()
    assert (work / "out" / "keep.txt").read_text() == "an earlier output lives here"


# ----- eval ---------------------------------------------------------------------------------
def test_eval_non_utf8_text(work: Path, capsys) -> None:
    (work / "bad.txt").write_bytes(b"\xff\xfe binary \x80")
    rejects(capsys, work, ["eval", "perplexity", "--model", str(work / "model"), "--data",
                           str(work / "bad.txt"), "--backend", "torch"], "bad.txt: not UTF-8 text")


def test_eval_context_longer_than_model(work: Path, capsys) -> None:
    rejects(capsys, work, ["eval", "perplexity", "--model", str(work / "model"), "--data",
                           str(work / "data" / "train.jsonl"), "--context-length", "100000",
                           "--backend", "torch", "--output", str(work / "out" / "keep.txt")],
            "--context-length 100000")


# ----- init ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("flags", "mentions", "code"), [
    (["--vocab-size", "0"], "--vocab-size must be at least 1", 1),
    (["--vocab-size", "1e12"], "--vocab-size", 2),
    (["--vocab-size", str(10**12)], "GB of float32 weights", 1),
    (["--dtype", "float8"], "float8", 1),
], ids=["vocab 0", "vocab 1e12", "vocab 10**12", "dtype"])
def test_init_flags(work: Path, capsys, flags: list[str], mentions: str, code: int) -> None:
    rejects(capsys, work, ["init", str(work / "out"), "--preset", "elm-tiny", "--force", *flags],
            mentions, code=code)


# ----- train --------------------------------------------------------------------------------
def train_config(work: Path, token_data: Path) -> Path:
    from support.training import write_config

    return write_config(work / "train.yaml", token_data, work / "run",
                        train={"max_steps": 2, "seq_len": 16, "micro_batch_size": 2},
                        checkpoint={"dir": str(work / "ckpt")})


@pytest.mark.parametrize(("override", "mentions"), [
    ("optim.lr=.nan", "optim.lr: expected a finite number"),
    ("optim.lr=-1", "optim.lr: must not be negative"),
    ("train.seq_len=100000", "train.seq_len 100000 is longer than the model's max_context_length"),
    ("checkpoint.dir={work}/a-file", "checkpoint.dir:"),
    ("log.run_dir={work}/a-file", "log.run_dir:"),
], ids=["lr nan", "lr negative", "seq_len", "checkpoint.dir file", "run_dir file"])
def test_train_settings(work: Path, token_data: Path, capsys, override: str, mentions: str) -> None:
    config = train_config(work, token_data)
    rejects(capsys, work, ["train", str(config), override.format(work=work)], mentions)


def test_train_token_ids_beyond_vocabulary(work: Path, token_data: Path, capsys) -> None:
    data = work / "tokens"
    shutil.copytree(token_data, data)
    index = json.loads((data / "index.json").read_text())
    index["vocab_size"] = 300  # the shards hold ids up to 511
    (data / "index.json").write_text(json.dumps(index))
    config = train_config(work, data)
    # Checked batch by batch as training reads it (a scan of every shard would not scale):
    # the run directory exists by then, no checkpoint does.
    rejects(capsys, data, ["train", str(config), "model.vocab_size=512"],
            "not below the vocab_size 300")
    assert not (work / "ckpt").exists()


@pytest.mark.slow
def test_resume_with_other_settings_and_metrics_without_repeats(work: Path, token_data: Path,
                                                                capsys) -> None:
    config = train_config(work, token_data)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(config), "checkpoint.every=1"])
    assert exit_info.value.code == 0
    # A step logged after the last checkpoint, as a killed run leaves it.
    with (work / "run" / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")
    capsys.readouterr()
    for override, key in (("train.seq_len=24", "train.seq_len"), ("optim.lr=0.5", "optim.lr")):
        rejects(capsys, work, ["train", str(config), "train.max_steps=4", override], key)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(config), "train.max_steps=4"])
    assert exit_info.value.code == 0
    lines = (work / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [r["step"] for r in map(json.loads, lines) if "event" not in r]
    assert steps == [1, 2, 3, 4]
    assert 9.0 not in [json.loads(line).get("loss") for line in lines]


# ----- Ctrl-C ---------------------------------------------------------------------------------
def test_interrupt_is_one_line(work: Path, capsys, monkeypatch) -> None:
    """Ctrl-C: one line and the shell's 130, nothing written."""
    import elm_train.modeldir

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(elm_train.modeldir, "init_model", interrupted)
    line = rejects(capsys, work, ["init", str(work / "out"), "--preset", "elm-tiny", "--force"],
                   "interrupted", code=130)
    assert line == "error: interrupted"
