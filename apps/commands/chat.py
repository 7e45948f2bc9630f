"""`elm chat`: a terminal chat with a model (and adapters), streaming, with history."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from apps.commands.generate import (
    CHAT_TEMPLATE_HELP,
    DRAFT_MODEL_HELP,
    KV_BITS_HELP,
    KV_GROUP_SIZE_HELP,
    NUM_DRAFT_TOKENS_HELP,
    QUANTIZED_KV_START_HELP,
    check_prompt_cache_flags,
)
from apps.process import keep_torch_out

HELP = "commands: /reset (new conversation), /system TEXT (set the system prompt), /quit"


def saved_start(path: Path, model: Any, model_name: Path, adapter_path: Path | None,
                kv_bits: int | None, kv_group_size: int) -> Callable[[], tuple[list, list[int]]]:
    """Where each conversation starts: the cache in PATH (read again at each /reset), which
    must record the tokens it holds, as elm's do."""
    from elm_mlx import prompt_cache
    from elm_spec.hub import resolve

    model_dir = resolve(model_name)
    adapter_dir = None if adapter_path is None else resolve(adapter_path)

    def read() -> tuple[list, list[int]]:
        saved = prompt_cache.load(path, model, model_name, model_dir, adapter_dir, kv_bits,
                                  kv_group_size)
        return saved.cache, prompt_cache.held_tokens(saved)

    first = [read()]  # refused now, not at the first /reset

    def start() -> tuple[list, list[int]]:
        return first.pop() if first else read()

    return start


def register(app: typer.Typer) -> None:
    @app.command("chat")
    def chat(
        model: Path = typer.Option(..., "--model", help="Model directory (plain or quantized)."),
        adapter_path: Path = typer.Option(None, "--adapter-path", help="LoRA adapter directory."),
        chat_template: str = typer.Option(None, "--chat-template", help=CHAT_TEMPLATE_HELP),
        system_prompt: str = typer.Option(None, "--system-prompt", help="System turn of every chat."),
        max_tokens: int = typer.Option(256, "--max-tokens", "-m", help="Most tokens per answer."),
        temp: float = typer.Option(0.0, "--temp", help="Sampling temperature; 0 is greedy."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold."),
        top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0: all)."),
        min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min-p x the top probability."),
        seed: int = typer.Option(None, "--seed", help="Random seed for sampling."),
        draft_model: Path = typer.Option(None, "--draft-model", help=DRAFT_MODEL_HELP),
        num_draft_tokens: int = typer.Option(3, "--num-draft-tokens", help=NUM_DRAFT_TOKENS_HELP),
        kv_bits: int = typer.Option(None, "--kv-bits", help=KV_BITS_HELP),
        kv_group_size: int = typer.Option(64, "--kv-group-size", help=KV_GROUP_SIZE_HELP),
        quantized_kv_start: int = typer.Option(5000, "--quantized-kv-start",
                                               help=QUANTIZED_KV_START_HELP),
        prompt_cache_file: Path = typer.Option(
            None, "--prompt-cache-file", help="Start every conversation from a prompt cache saved "
            "by elm generate --save-prompt-cache (reused as far as the conversation agrees)."),
        verbose: bool = typer.Option(False, "--verbose", help="After each answer, print how many "
                                     "prompt tokens were prefilled and how many came from the cache."),
    ) -> None:
        """Chat with a model in the terminal; Ctrl-C stops an answer, Ctrl-D or /quit leaves."""
        keep_torch_out()
        from elm_mlx import load
        from elm_mlx.chat import ChatSession, TurnStats
        from elm_mlx.generate import (
            NO_TEMPLATE_ADVICE,
            check_draft_options,
            check_generation_options,
            check_kv_options,
            load_draft,
        )
        from elm_spec import ElmError

        options = dict(max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                       seed=seed, kv_bits=kv_bits, kv_group_size=kv_group_size,
                       quantized_kv_start=quantized_kv_start)
        check_generation_options(max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k,
                                 min_p=min_p)
        check_kv_options(kv_bits, kv_group_size, quantized_kv_start)
        if draft_model is not None:
            check_draft_options(num_draft_tokens)
            options["num_draft_tokens"] = num_draft_tokens
        check_prompt_cache_flags(prompt_cache_file, draft_model=draft_model)
        mlx_model, tokenizer = load(model, adapter_path=adapter_path, chat_template=chat_template)
        if not tokenizer.has_chat_template:
            raise ElmError(NO_TEMPLATE_ADVICE)
        check_kv_options(kv_bits, kv_group_size, quantized_kv_start, mlx_model.spec.head_dim)
        draft = None if draft_model is None else load_draft(draft_model, model, mlx_model, tokenizer)
        start = None
        if prompt_cache_file is not None:
            start = saved_start(prompt_cache_file, mlx_model, model, adapter_path, kv_bits,
                                kv_group_size)
        session = ChatSession(mlx_model, tokenizer, system_prompt, options, draft, start)
        interactive = sys.stdin.isatty()
        if interactive:
            print(HELP)
        while True:
            try:
                line = input(">> " if interactive else "")
            except (EOFError, KeyboardInterrupt):
                print()
                return
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                return
            if text == "/reset":
                session.reset()
                print("[new conversation]", flush=True)
                continue
            if text == "/system" or text.startswith("/system "):
                session.system_prompt = text[len("/system"):].strip() or None
                session.reset()
                print("[system prompt set; new conversation]", flush=True)
                continue
            if text.startswith("/"):
                print(f"[unknown command {text.split()[0]}; {HELP}]", flush=True)
                continue
            stats: list[TurnStats] = []
            answer = session.send(text, stats)
            try:
                for response in answer:
                    print(response.text, end="", flush=True)
            except KeyboardInterrupt:
                answer.close()
                print(" [stopped]", end="")
            print(flush=True)
            if verbose and stats:
                turn = stats[0]
                print(f"[prompt {turn.prompt_tokens} tokens: {turn.prefilled_tokens} prefilled, "
                      f"{turn.prompt_tokens - turn.prefilled_tokens} from the cache; "
                      f"{turn.generation_tokens} generated at {turn.generation_tps:.1f} tokens/s]",
                      flush=True)
