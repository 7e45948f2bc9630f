"""CatLIP model directories (torch layout, as training exports them) to MLX ViT directories.

Needs neither torch nor MLX: safetensors' numpy API reads and writes, and the only change of
layout is the convolution weights' (elm_spec.vit.to_mlx_layout).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from elm_spec import ElmError
from elm_spec.modeldir import CONFIG_FILE, SINGLE_WEIGHTS_FILE, atomic_output_dir, write_json
from elm_spec.vit import VOCAB_JSON, VOCAB_PICKLE, is_catlip_dir, read_catlip_config, to_mlx_layout


def is_catlip_source(path: str | os.PathLike[str]) -> bool:
    """True for a CatLIP model directory (config.json with model_type catlip_vit)."""
    return is_catlip_dir(path)


def convert_catlip(src: str | os.PathLike[str], dst: str | os.PathLike[str], force: bool = False) -> str:
    """Write DST: the same CatLIP directory with MLX-layout weights ("framework": "mlx");
    returns its summary line."""
    import dataclasses

    from safetensors import SafetensorError
    from safetensors.numpy import load_file, save_file

    source = Path(src)
    config = read_catlip_config(source)
    if config.framework == "mlx":
        raise ElmError(f"{source}: is already an MLX CatLIP directory")
    file = source / SINGLE_WEIGHTS_FILE
    if not file.is_file():
        raise ElmError(f"{source}: no {SINGLE_WEIGHTS_FILE}")
    try:
        weights = load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise ElmError(f"{file}: cannot be read ({error})") from None
    with atomic_output_dir(dst, force=force) as staging:
        save_file({k: to_mlx_layout(k, v) for k, v in weights.items()},
                  str(staging / SINGLE_WEIGHTS_FILE), metadata={"format": "mlx"})
        write_json(staging / CONFIG_FILE, dataclasses.replace(config, framework="mlx").to_json())
        for name in (VOCAB_JSON, VOCAB_PICKLE):
            if (source / name).is_file():
                shutil.copy2(source / name, staging / name)
    vit = config.vit
    parameters = sum(value.size for value in weights.values())
    return (f"{dst}: MLX CatLIP directory, ViT {vit.num_layers} layers x {vit.embed_dim}, "
            f"{vit.image_size} px in {vit.patch_size} px patches, {vit.num_classes} synset "
            f"classes, {parameters / 1e6:.1f}M parameters")
