"""`elm generate`: stream a continuation from a model directory with MLX, as `mlx_lm.generate` does."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from apps.process import keep_torch_out
from elm_spec import ElmError


def read_prompt(prompt: str) -> str:
    """`-` reads standard input; `\\n` and `\\t` escapes are expanded, as in mlx-lm."""
    if prompt == "-":
        return sys.stdin.read()
    return prompt.replace("\\n", "\n").replace("\\t", "\t")


CHAT_TEMPLATE_HELP = ("Jinja chat template file ('none': raw prompts); by default the adapters' "
                      "recorded template, else the model's.")
DRAFT_MODEL_HELP = ("A smaller model with the same tokenizer that drafts tokens for the model "
                    "to check (speculative decoding; greedy output is unchanged).")
NUM_DRAFT_TOKENS_HELP = "Tokens the draft model proposes at a time."
KV_BITS_HELP = "Quantize the KV cache to this many bits (2, 3, 4, 5, 6 or 8); default: not quantized."
KV_GROUP_SIZE_HELP = "Group size of the KV cache quantization (32, 64 or 128)."
QUANTIZED_KV_START_HELP = "With --kv-bits, quantize the KV cache once it holds this many tokens."
PROMPT_CACHE_FILE_HELP = ("Start from a prompt cache saved by --save-prompt-cache or "
                          "mlx_lm.cache_prompt (.safetensors); the prompt continues the cached one.")


def check_prompt_cache_flags(load_from: Path | None, save_to: Path | None = None,
                             draft_model: Path | None = None, max_kv_size: int | None = None) -> None:
    """The flags a prompt cache file does not combine with, refused before any work."""
    from elm_mlx.prompt_cache import check_file_name

    given = [flag for flag, value in (("--prompt-cache-file", load_from),
                                      ("--save-prompt-cache", save_to)) if value is not None]
    for flag, value in (("--prompt-cache-file", load_from), ("--save-prompt-cache", save_to)):
        if value is not None:
            check_file_name(value, flag)
    if given and draft_model is not None:
        raise ElmError(f"{given[0]} does not combine with --draft-model (the file holds no cache "
                       "for the draft)")
    if given and max_kv_size is not None:
        raise ElmError(f"{given[0]} does not combine with --max-kv-size (a rotating cache holds "
                       "no fixed prefix)")


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        model: Path = typer.Option(..., "--model", help="Model directory (plain or quantized)."),
        prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text; '-' reads stdin."),
        max_tokens: int = typer.Option(100, "--max-tokens", "-m", help="Most tokens to generate."),
        temp: float = typer.Option(0.0, "--temp", help="Sampling temperature; 0 is greedy."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold."),
        top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0: all)."),
        min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min-p x the top probability."),
        repetition_penalty: float = typer.Option(None, "--repetition-penalty",
                                                 help="Penalty (> 1) for recently generated tokens."),
        repetition_context_size: int = typer.Option(20, "--repetition-context-size",
                                                    help="Tokens the repetition penalty looks back."),
        seed: int = typer.Option(None, "--seed", help="Random seed for sampling."),
        adapter_path: Path = typer.Option(None, "--adapter-path", help="LoRA adapter directory."),
        max_kv_size: int = typer.Option(None, "--max-kv-size",
                                        help="Keep a rotating KV cache of this many tokens."),
        prefill_step_size: int = typer.Option(2048, "--prefill-step-size",
                                              help="Prompt tokens processed at a time."),
        chat_template: str = typer.Option(None, "--chat-template", help=CHAT_TEMPLATE_HELP),
        ignore_chat_template: bool = typer.Option(
            False, "--ignore-chat-template", help="Use the raw prompt even if the tokenizer has a chat template."),
        system_prompt: str = typer.Option(None, "--system-prompt", help="System turn for the chat template."),
        draft_model: Path = typer.Option(None, "--draft-model", help=DRAFT_MODEL_HELP),
        num_draft_tokens: int = typer.Option(3, "--num-draft-tokens", help=NUM_DRAFT_TOKENS_HELP),
        kv_bits: int = typer.Option(None, "--kv-bits", help=KV_BITS_HELP),
        kv_group_size: int = typer.Option(64, "--kv-group-size", help=KV_GROUP_SIZE_HELP),
        quantized_kv_start: int = typer.Option(5000, "--quantized-kv-start",
                                               help=QUANTIZED_KV_START_HELP),
        prompt_cache_file: Path = typer.Option(None, "--prompt-cache-file",
                                               help=PROMPT_CACHE_FILE_HELP),
        save_prompt_cache: Path = typer.Option(
            None, "--save-prompt-cache", help="After generating, save the prompt's KV cache "
            "(.safetensors, mlx-lm's format) for --prompt-cache-file to start from."),
        verbose: bool = typer.Option(True, "--verbose/--quiet",
                                     help="Print the statistics lines, or only the generated text."),
    ) -> None:
        """Generate text from a model directory (MLX), streaming it to stdout."""
        keep_torch_out()
        from elm_mlx import load, prompt_cache
        from elm_mlx.generate import (
            check_draft_options,
            check_generation_options,
            check_kv_options,
            load_draft,
            stream_generate,
        )
        from elm_spec.hub import resolve

        check_generation_options(max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k,
                                 min_p=min_p, repetition_penalty=repetition_penalty,
                                 repetition_context_size=repetition_context_size,
                                 max_kv_size=max_kv_size, prefill_step_size=prefill_step_size)
        check_kv_options(kv_bits, kv_group_size, quantized_kv_start)
        if draft_model is not None:
            check_draft_options(num_draft_tokens, max_kv_size, repetition_penalty)
        check_prompt_cache_flags(prompt_cache_file, save_prompt_cache, draft_model, max_kv_size)
        if system_prompt is not None and ignore_chat_template:
            raise ElmError("--system-prompt needs the chat template; drop --ignore-chat-template")
        text = read_prompt(prompt)
        mlx_model, tokenizer = load(model, adapter_path=adapter_path, chat_template=chat_template)
        draft = None if draft_model is None else load_draft(draft_model, model, mlx_model, tokenizer)
        use_template = False if ignore_chat_template else None
        if system_prompt is not None:
            use_template = True
        model_dir = resolve(model)
        adapter_dir = None if adapter_path is None else resolve(adapter_path)
        saved = None if prompt_cache_file is None else prompt_cache.load(
            prompt_cache_file, mlx_model, model, model_dir, adapter_dir, kv_bits, kv_group_size)
        full = prompt_cache.prepare_prompt(mlx_model, tokenizer, text, use_template, system_prompt,
                                           saved, keep=save_prompt_cache is not None)
        if verbose:
            print("=" * 10)
        response, drafted = None, 0
        for response in stream_generate(
                mlx_model, tokenizer, full.rest, max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k,
                min_p=min_p, repetition_penalty=repetition_penalty,
                repetition_context_size=repetition_context_size, max_kv_size=max_kv_size, seed=seed,
                prefill_step_size=prefill_step_size, draft_model=draft,
                num_draft_tokens=num_draft_tokens, kv_bits=kv_bits, kv_group_size=kv_group_size,
                quantized_kv_start=quantized_kv_start, prompt_cache=full.cache):
            print(response.text, end="", flush=True)
            drafted += response.from_draft
        print()
        if save_prompt_cache is not None:
            prompt_cache.keep_prompt(save_prompt_cache, full, model, model_dir, adapter_dir)
        if verbose and response is not None:
            print("=" * 10)
            print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
            if saved is not None:
                held = f"{full.cached} tokens" if full.ids is not None else "its tokens"
                print(f"Prompt cache: {held} reused from {saved.path}")
            if save_prompt_cache is not None:
                print(f"Prompt cache saved: {save_prompt_cache} ({full.cache[0].offset} tokens)")
            print(f"Generation: {response.generation_tokens} tokens, "
                  f"{response.generation_tps:.3f} tokens-per-sec")
            if draft is not None:
                print(f"Draft: {drafted} of {response.generation_tokens} tokens accepted from "
                      "the draft model")
            print(f"Peak memory: {response.peak_memory:.3f} GB")
