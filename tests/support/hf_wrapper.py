"""An elm PyTorch model as a transformers `PreTrainedModel`, so lm-eval's `hf` model can run it
without Apple's remote code (which these tests cannot download)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from elm_spec.modeldir import read_config


class ElmAsTransformers(PreTrainedModel):
    config_class = PretrainedConfig
    base_model_prefix = "net"

    def __init__(self, config: PretrainedConfig, net: torch.nn.Module):
        super().__init__(config)
        self.net = net

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **unused) -> CausalLMOutput:
        return CausalLMOutput(logits=self.net(input_ids))


def wrap_for_transformers(model_dir: Path) -> ElmAsTransformers:
    from elm_train import load_model

    config = PretrainedConfig(**read_config(model_dir))
    return ElmAsTransformers(config, load_model(model_dir).eval())
