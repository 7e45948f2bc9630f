"""Every bad input to `elm convert`: one clear error line, exit status 1, DST as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.cli import REPO
from support.corenet import corenet_yaml, save_corenet
from support.disk import limit_file_size

from apps.cli import main
from elm_spec import ModelSpec

TINY = ModelSpec.from_preset("elm-tiny")


def snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def fails(capsys, *args: str, dst: Path, mentions: str) -> str:
    """Run `elm convert ARGS`; it must exit 1 with one `error:` line naming MENTIONS, leaving DST
    and the directory around it as they were."""
    before = snapshot(dst) if dst.exists() else None
    siblings = sorted(p.name for p in dst.parent.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", *args])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert mentions in errors[0], errors[0]
    assert (snapshot(dst) if dst.exists() else None) == before
    assert sorted(p.name for p in dst.parent.iterdir()) == siblings, "temporary files left behind"
    return errors[0]


@pytest.fixture()
def source(make_model_dir, tmp_path: Path) -> Path:
    copy = tmp_path / "src"
    shutil.copytree(make_model_dir(TINY, seed=11), copy)
    return copy


@pytest.fixture()
def dst(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier model lives here")
    return out


def rewrite_weights(directory: Path, change) -> None:
    weights = load_file(directory / "model.safetensors")
    change(weights)
    save_file(weights, directory / "model.safetensors")


def test_missing_config(source: Path, dst: Path, capsys) -> None:
    (source / "config.json").unlink()
    fails(capsys, str(source), str(dst), "--force", dst=dst, mentions="no config.json")


def test_truncated_safetensors(source: Path, dst: Path, capsys) -> None:
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    fails(capsys, str(source), str(dst), "--force", dst=dst, mentions="truncated")


def test_corrupt_safetensors_header(source: Path, dst: Path, capsys) -> None:
    data = bytearray((source / "model.safetensors").read_bytes())
    data[8:40] = b"\x00garbage, not json at all......."
    (source / "model.safetensors").write_bytes(bytes(data))
    fails(capsys, str(source), str(dst), "--force", dst=dst, mentions="corrupt safetensors header")


def test_wrong_shape(source: Path, dst: Path, capsys) -> None:
    name = "transformer.layers.2.attn.out_proj.weight"
    rewrite_weights(source, lambda w: w.update({name: w[name][:, :-16].contiguous()}))
    fails(capsys, str(source), str(dst), "--force", dst=dst, mentions=name)


def test_missing_tensor(source: Path, dst: Path, capsys) -> None:
    name = "transformer.layers.1.ffn.proj_2.weight"
    rewrite_weights(source, lambda w: w.pop(name))
    line = fails(capsys, str(source), str(dst), "--force", dst=dst, mentions=name)
    assert "missing" in line


def test_unknown_model_type(source: Path, dst: Path, capsys) -> None:
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    fails(capsys, str(source), str(dst), "--force", dst=dst, mentions="'llama' is not supported")


def test_missing_tokenizer(source: Path, dst: Path, capsys) -> None:
    (source / "tokenizer.model").unlink()
    (source / "tokenizer.json").unlink()
    fails(capsys, str(source), str(dst), "--force", dst=dst, mentions="no tokenizer")


def test_existing_destination(source: Path, dst: Path, capsys) -> None:
    fails(capsys, str(source), str(dst), dst=dst, mentions="already exists")


def test_nan_weights_named(source: Path, dst: Path, capsys) -> None:
    name = "transformer.layers.3.ffn.proj_1.weight"
    rewrite_weights(source, lambda w: w[name].view(-1).__setitem__(5, float("nan")))
    fails(capsys, str(source), str(dst), "--force", dst=dst, mentions=f"{name!r} has 1 NaN/inf")


class RunsCode:
    """A pickle that would create a file when unpickled by a loader that executes code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_is_not_a_state_dict_is_refused_unexecuted(tmp_path: Path, dst: Path,
                                                               tokenizer_dir: Path, capsys) -> None:
    marker = tmp_path / "code-ran"
    torch.save({"token_embeddings.weight": torch.zeros(2), "evil": RunsCode(marker)},
               tmp_path / "evil.pt")
    fails(capsys, str(tmp_path / "evil.pt"), str(dst), "--force", "--preset", "elm-tiny",
          "--tokenizer", str(tokenizer_dir), dst=dst, mentions="refused to unpickle")
    assert not marker.exists()
    # the same file really does run code when loaded without weights_only
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_truncated_corenet_checkpoint(tmp_path: Path, dst: Path, tokenizer_dir: Path, capsys) -> None:
    save_corenet(TINY, tmp_path / "c.pt", rows=640)
    (tmp_path / "c.pt").write_bytes((tmp_path / "c.pt").read_bytes()[:5000])
    fails(capsys, str(tmp_path / "c.pt"), str(dst), "--force", "--preset", "elm-tiny",
          "--tokenizer", str(tokenizer_dir), dst=dst, mentions="truncated or corrupt")


def test_vocab_size_conflicts(tmp_path: Path, dst: Path, tokenizer_dir: Path, capsys) -> None:
    save_corenet(TINY, tmp_path / "c.pt", rows=640)
    common = [str(tmp_path / "c.pt"), str(dst), "--force", "--preset", "elm-tiny", "--tokenizer",
              str(tokenizer_dir)]
    fails(capsys, *common, "--vocab-size", "700", dst=dst, mentions="larger than the checkpoint's 640")
    fails(capsys, *common, "--vocab-size", "400", dst=dst, mentions="has 512 pieces, more than")


def test_unknown_preset_and_bad_corenet_yaml(tmp_path: Path, dst: Path, tokenizer_dir: Path,
                                             capsys) -> None:
    save_corenet(TINY, tmp_path / "c.pt", rows=640)
    common = [str(tmp_path / "c.pt"), str(dst), "--force", "--tokenizer", str(tokenizer_dir)]
    fails(capsys, *common, "--preset", "OpenELM-9B", dst=dst, mentions="unknown preset 'OpenELM-9B'")
    corenet_yaml(tmp_path / "c.yaml", "OpenELM-9B", 640)
    fails(capsys, *common, "--corenet-config", str(tmp_path / "c.yaml"), dst=dst,
          mentions="general_gpt.model_name")
    fails(capsys, *common, dst=dst, mentions="carries no model shape")


def test_corenet_shape_mismatch(tmp_path: Path, dst: Path, tokenizer_dir: Path, capsys) -> None:
    save_corenet(TINY, tmp_path / "c.pt", rows=640)
    fails(capsys, str(tmp_path / "c.pt"), str(dst), "--force", "--preset", "elm-small",
          "--tokenizer", str(tokenizer_dir), dst=dst, mentions="has shape")


def test_disk_full_mid_write(source: Path, dst: Path) -> None:
    """A real write failure part-way through the weights (file size limit in a subprocess)."""
    before = snapshot(dst)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "apps", "convert", str(source), str(dst), "--force"],
                            capture_output=True, text=True, env=env,
                            preexec_fn=lambda: limit_file_size(200_000), timeout=300)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "write failed" in errors[0], result.stderr
    assert snapshot(dst) == before
    assert sorted(p.name for p in dst.parent.iterdir()) == ["out", "src"]


def test_disk_full_after_first_shard(make_model_dir, tmp_path: Path, monkeypatch) -> None:
    """ENOSPC when the second shard is opened: one clear line, the old DST kept, no temp dir left."""
    import errno

    from convert import ConvertOptions, convert
    from convert.safetensors_io import ShardedWriter
    from elm_spec import ElmError

    source = make_model_dir(TINY, seed=12)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("an earlier model lives here")
    opened: list[int] = []
    real_open = ShardedWriter._open_next_shard

    def open_until_disk_full(writer: ShardedWriter) -> None:
        opened.append(writer.shard_number)
        if writer.shard_number == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_open(writer)

    monkeypatch.setattr(ShardedWriter, "_open_next_shard", open_until_disk_full)
    with pytest.raises(ElmError, match=r"write failed \(disk full\); nothing was changed"):
        convert(source, dst, ConvertOptions(force=True, progress=False, max_shard_bytes=100_000))
    assert opened == [0, 1]
    assert snapshot(dst) == {"keep.txt": b"an earlier model lives here"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
