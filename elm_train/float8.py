"""float8 training (`train.float8`): torchao swaps the blocks' Linear layers for Float8Linear,
whose matmuls run in float8 with dynamic scales (per tensor, or per row), as torchtitan does.

float8 tensor cores exist from compute capability 8.9 (Ada, Hopper, Blackwell); anywhere else
the run is refused with one line before anything is built.
"""

from __future__ import annotations

import torch
from torch import nn

from elm_spec import ElmError
from elm_train.parallel import transformer_blocks

MIN_CAPABILITY = (8, 9)


def check_float8(recipe: str, device: torch.device) -> None:
    """Refuse float8 where it cannot run: on a CPU, on a GPU older than 8.9, without torchao."""
    if recipe == "none":
        return
    if device.type != "cuda":
        raise ElmError(f"train.float8: {recipe!r} needs a CUDA GPU of compute capability 8.9 or "
                       f"newer (Ada, Hopper, Blackwell); this run is on the {device.type.upper()}; "
                       "set train.float8=none")
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        raise ElmError(f"train.float8: {torch.cuda.get_device_name(device)} has compute "
                       f"capability {capability[0]}.{capability[1]}; float8 matmuls need 8.9 or "
                       "newer (Ada, Hopper, Blackwell); set train.float8=none")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise ElmError("train.float8: needs the torchao package (pip install 'elm[float8]')"
                       ) from None


def convert_to_float8(model: nn.Module, recipe: str) -> int:
    """Swap the Linear layers inside the transformer blocks whose sizes float8 matmuls take
    (multiples of 16) for torchao's Float8Linear; the embedding and any output head stay as
    they are, as torchtitan leaves its output layer. Returns how many were swapped. The weights and
    their names do not change, so checkpoints load either way."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    swapped = 0
    for block in transformer_blocks(model):
        before = sum(isinstance(m, nn.Linear) for m in block.modules())
        convert_to_float8_training(block, config=config, module_filter_fn=_fits)
        swapped += before - sum(type(m) is nn.Linear for m in block.modules())
    return swapped


def _fits(module: nn.Module, name: str) -> bool:
    return (isinstance(module, nn.Linear) and module.in_features % 16 == 0
            and module.out_features % 16 == 0)
