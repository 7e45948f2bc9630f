"""`elm` as an lm-eval-harness model: `--model elm --model_args pretrained=DIR,backend=mlx`.

Importing this module registers the model with lm-eval (`register_model`): lm-eval 0.4 has no
plugin path for models (entry points are not read; `--include_path` is for tasks), so
`elm eval harness ARGS` imports it and runs lm-eval's command line, and Python code imports it
before `lm_eval.simple_evaluate(model="elm", ...)`. Nothing is installed into other processes.

model_args: pretrained (model directory, required), backend (torch or mlx), adapter_path (mlx),
dtype, max_length (default: the model's context), add_bos_token (default True), max_gen_toks
(default 256).

BOS follows lm-eval's `hf` model for each setting of add_bos_token: with True (what `hf` does
by default, since elm's tokenizer adds BOS) every encoded string starts with BOS unless it
already begins with `<s>`, and rolling documents are encoded the same way and then scored
after the BOS prefix token (so the first scored token is BOS itself, conditioned on BOS);
with False nothing is added and documents are scored after the prefix alone.
"""

from __future__ import annotations

import logging
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from elm_eval.backend import DEFAULT_BATCH_SIZE, chosen_backend, load_eval_model
from elm_eval.model import window_count

logger = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256


def _batch_size(value: Any) -> int:
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    return int(value)


def _device(backend: str, device: str | None) -> str | None:
    """lm-eval passes --device (default cuda:0) to every model; keep what this backend can use."""
    if device is None:
        return None
    if backend == "mlx":
        return device if device in ("cpu", "gpu") else None
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            logger.warning("device %s is not available; the elm model runs on the CPU", device)
            return None
    return device


@register_model("elm")
class ElmLM(TemplateLM):
    def __init__(self, pretrained: str, backend: str | None = None,
                 adapter_path: str | None = None, dtype: str | None = None,
                 max_length: int | None = None, add_bos_token: bool = True,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, batch_size: Any = None,
                 device: str | None = None, **unused: Any):
        super().__init__()
        if unused:
            logger.warning("elm model ignores model_args %s", ", ".join(sorted(unused)))
        backend = backend or chosen_backend(pretrained)
        self.model = load_eval_model(pretrained, backend=backend, adapter_path=adapter_path,
                                     batch_size=_batch_size(batch_size), max_length=max_length,
                                     dtype=dtype, device=_device(backend, device))
        self.tokenizer = self.model.tokenizer
        self.add_bos_token = add_bos_token
        self.max_gen_toks = max_gen_toks

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self.model.max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.model.model_dir / "tokenizer.model")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and string.startswith("<s>"):
            add_bos = False  # lm-eval's rule for strings that already begin with BOS
        return self.tokenizer.encode(string, bos=add_bos)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="elm loglikelihood")
        results = self.model.loglikelihood([(context, continuation)
                                            for _, context, continuation in requests], bar.update)
        bar.close()
        for (strings, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False
                              ) -> list[float]:
        texts = [self.tok_encode(request.args[0]) for request in requests]
        windows = sum(window_count(len(t), self.max_length, self.max_length) for t in texts)
        bar = tqdm(total=windows, disable=disable_tqdm, desc="elm loglikelihood_rolling")
        scores = self.model.loglikelihood_rolling(texts, self.prefix_token_id, progress=bar.update)
        bar.close()
        for request, score in zip(requests, scores, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, score.logprob)
        return [score.logprob for score in scores]

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tokenizer.decode([self.eot_token_id])
        outputs = []
        for request in tqdm(requests, disable=disable_tqdm, desc="elm generate_until"):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs)
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_tokens = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            if gen_kwargs.pop("do_sample", False) and float(gen_kwargs.get("temperature", 0.0)) > 0:
                raise ValueError("the elm lm-eval backend decodes greedily; "
                                 "set do_sample=False or temperature=0")
            text = self.model.generate_until(self.tok_encode(context), until, max_tokens)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
        return outputs
