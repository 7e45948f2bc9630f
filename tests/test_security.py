"""Nothing from an untrusted file runs or reaches outside its directory (docs/security.md)."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from support.cli import REPO, one_line_failure, run_elm
from support.training import THREAD_ENV

from elm_spec import ElmError, ModelSpec

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]


class RunsCode:
    """Unpickled by a loader that executes code, this creates MARKER."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))




def poison_metadata(step_dir: Path, marker: Path) -> None:
    """The real `.metadata` with a code-running object hidden in one of its fields."""
    path = step_dir / ".metadata"
    with path.open("rb") as handle:
        metadata = pickle.load(handle)
    metadata.planner_data = {"hook": RunsCode(marker)}
    path.write_bytes(pickle.dumps(metadata))


def commands(run: Path) -> dict[str, list[str]]:
    checkpoints = str(run / "checkpoints")
    return {"convert": ["convert", checkpoints, str(run / "mlx")],
            "export": ["export", checkpoints, str(run / "model")],
            "train": ["train", str(run / "train.yaml"), "train.max_steps=6"]}


@pytest.mark.parametrize("command", ["convert", "export", "train"])
def test_code_in_checkpoint_metadata_never_runs(run_copy: Path, command: str) -> None:
    shutil.rmtree(run_copy / "checkpoints" / "step-2")  # nothing to fall back to
    step_dir = run_copy / "checkpoints" / "step-4"
    marker = run_copy / "code-ran"
    poison_metadata(step_dir, marker)
    result = run_elm(*commands(run_copy)[command], env=THREAD_ENV)
    one_line_failure(result, ".metadata", "refused to unpickle")
    assert not marker.exists()
    # The same file does run code under DCP's own reader (plain pickle.load).
    with (run_copy / "checkpoints").glob("step-4*").__next__().joinpath(".metadata").open("rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_code_in_optimizer_values_never_runs(run_copy: Path) -> None:
    """DCP stores non-tensor values (optimizer hyper-parameters) as pickles in `.distcp` files."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from elm_train.checkpoint import Checkpointer
    from elm_train.config import load_config
    from elm_train.parallel import DistContext
    from elm_train.tasks.lm import LanguageModelTask

    step_dir = run_copy / "checkpoints" / "step-4"
    marker = run_copy / "code-ran"
    config = load_config(step_dir / "train_config.yaml")
    model = LanguageModelTask.for_export(config, step_dir).build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model_state, optim_state = get_state_dict(model, optimizer)
    optim_state["param_groups"][0]["lr"] = RunsCode(marker)
    for old in [*step_dir.glob("*.distcp"), step_dir / ".metadata"]:
        old.unlink()
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(step_dir), no_dist=True)

    ctx = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1,
                      device=torch.device("cpu"))
    with pytest.raises(ElmError) as error:
        Checkpointer(run_copy / "checkpoints", ctx, keep=2).load(step_dir, model, optimizer,
                                                                 None, None)
    assert "'optim.param_groups.0.lr'" in str(error.value)
    assert "refused to unpickle" in str(error.value)
    assert not marker.exists()


def test_code_in_rank_file_never_runs_and_resume_falls_back(run_copy: Path) -> None:
    step_dir = run_copy / "checkpoints" / "step-4"
    marker = run_copy / "code-ran"
    torch.save({"rng": RunsCode(marker)}, step_dir / "rank-00000.pt")
    result = run_elm("train", str(run_copy / "train.yaml"), "train.max_steps=5", env=THREAD_ENV)
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "rank-00000.pt" in warnings[0], result.stderr
    assert "resumed from" in result.stdout and "step-2" in result.stdout
    assert (run_copy / "checkpoints" / "step-4.damaged" / "rank-00000.pt").is_file()
    assert (run_copy / "checkpoints" / "step-5").is_dir()


def test_metadata_naming_a_file_outside_the_checkpoint_is_refused(run_copy: Path) -> None:
    from elm_train.safe_dcp import read_metadata

    step_dir = run_copy / "checkpoints" / "step-4"
    path = step_dir / ".metadata"
    with path.open("rb") as handle:
        metadata = pickle.load(handle)
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../../outside.distcp"
    path.write_bytes(pickle.dumps(metadata))
    with pytest.raises(ElmError, match=r"points outside .*; refused"):
        read_metadata(step_dir)


def test_restricted_unpickler_admits_real_metadata(trained: Path) -> None:
    from torch.distributed.checkpoint.metadata import Metadata

    from elm_train.safe_dcp import read_metadata

    metadata = read_metadata(trained / "checkpoints" / "step-4")
    with (trained / "checkpoints" / "step-4" / ".metadata").open("rb") as handle:
        reference = pickle.load(handle)
    assert isinstance(metadata, Metadata)
    assert metadata.state_dict_metadata.keys() == reference.state_dict_metadata.keys()
    assert pickle.dumps(metadata.state_dict_metadata) == pickle.dumps(reference.state_dict_metadata)


# ----- path traversal in indexes -------------------------------------------------------------
@pytest.fixture
def outside_fifo(tmp_path: Path) -> Path:
    """A named pipe outside the directory: opening it for reading would block the reader."""
    fifo = tmp_path / "secret.safetensors"
    os.mkfifo(fifo)
    return fifo


def write_index(model_dir: Path, names: list[str], shard: str) -> None:
    import json

    (model_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: shard for name in names}}))


def test_weight_index_entry_outside_the_model_dir_is_refused_unread(
        make_model_dir, tmp_path: Path, outside_fifo: Path) -> None:
    from elm_spec.modeldir import read_tensor_index

    model_dir = make_model_dir()
    local = tmp_path / "model"
    shutil.copytree(model_dir, local)
    names = list(read_tensor_index(model_dir))
    messages = {}
    for label, entry in (("existing", "../secret.safetensors"), ("absent", "../nothing.safetensors"),
                         ("absolute", str(outside_fifo))):
        write_index(local, names, entry)
        result = run_elm("convert", str(local), str(tmp_path / f"out-{label}"), timeout=120)
        messages[label] = one_line_failure(result, "model.safetensors.index.json", "refused")
        assert not (tmp_path / f"out-{label}").exists()
    # The text is the same whether or not the outside file exists: it reveals nothing.
    assert (messages["existing"].replace("secret", "X")
            == messages["absent"].replace("nothing", "X"))


def test_data_index_entry_outside_the_data_dir_is_refused_unread(token_data: Path, tmp_path: Path,
                                                                outside_fifo: Path) -> None:
    import json

    from elm_train.data.format import read_index

    data = tmp_path / "data"
    shutil.copytree(token_data, data)
    index = json.loads((data / "index.json").read_text())
    index["splits"]["train"][0]["file"] = "../secret.safetensors"
    (data / "index.json").write_text(json.dumps(index))
    with pytest.raises(ElmError) as error:
        read_index(data)
    assert str(error.value) == (f"{data / 'index.json'}: file entry '../secret.safetensors' "
                                f"points outside {data}; refused")


# ----- token ids beyond the embedding --------------------------------------------------------
def test_tokenizer_larger_than_the_embedding_is_refused(make_model_dir, tmp_path: Path) -> None:
    import elm_mlx

    small = make_model_dir(ModelSpec.from_preset("elm-tiny", vocab_size=300))  # tokenizer: 512
    with pytest.raises(ElmError) as error:
        elm_mlx.load(small)
    assert str(error.value) == (f"{small}: the tokenizer has 512 token ids, more than the model's "
                                "300 embedding rows (vocab_size in config.json)")
    fits = make_model_dir()
    model, tokenizer = elm_mlx.load(fits)
    assert max(tokenizer.get_vocab().values()) < model.spec.vocab_size


def test_generate_and_finetune_refuse_an_oversized_tokenizer(make_model_dir, tmp_path: Path) -> None:
    small = make_model_dir(ModelSpec.from_preset("elm-tiny", vocab_size=300))
    generated = run_elm("generate", "--model", str(small), "--prompt", "def", "--max-tokens", "4")
    one_line_failure(generated, str(small), "512 token ids", "300 embedding rows")
    (tmp_path / "data").mkdir()
    for split in ("train", "valid"):
        (tmp_path / "data" / f"{split}.jsonl").write_text('{"text": "def f(): pass"}\n' * 4)
    tuned = run_elm("finetune", "--lora", "--model", str(small), "--data", str(tmp_path / "data"),
                    "--adapter-path", str(tmp_path / "adapters"), "--iters", "2")
    one_line_failure(tuned, "512 token ids")
    assert not (tmp_path / "adapters" / "adapters.safetensors").exists()



# ----- modules in the working directory --------------------------------------------------------
@pytest.mark.slow
def test_modules_in_the_working_directory_never_run(tmp_path: Path) -> None:
    """`elm` run inside an untrusted directory (a cloned repo, say) imports nothing from it, for
    a PyTorch command and for an MLX command that restarts itself to preload OpenBLAS."""
    import subprocess
    import sys

    from elm_spec.platform import openblas_preload_path

    untrusted, marker = tmp_path / "project", tmp_path / "code-ran"
    untrusted.mkdir()
    for name in ("yaml", "torch", "typer", "numpy"):
        (untrusted / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    (untrusted / "config.yaml").write_text("model: {preset: elm-tiny}\n")
    script = tmp_path / "bin" / "elm"  # what installing the package puts on PATH
    script.parent.mkdir()
    script.write_text("import sys\nfrom apps.cli import main\nsys.exit(main())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ELM_OPENBLAS")}

    def elm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), *args], cwd=untrusted,
                              env={**env, "PYTHONPATH": str(REPO)}, capture_output=True,
                              text=True, timeout=300)

    one_line_failure(elm("train", "config.yaml"), "config.yaml: ")
    doctor = elm("doctor")
    assert not marker.exists(), marker.read_text()
    if openblas_preload_path() is not None:  # the restart happened, in the same directory
        assert "OpenBLAS preloaded: yes" in doctor.stdout, doctor.stdout + doctor.stderr
