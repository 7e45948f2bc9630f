"""`elm serve`: an OpenAI-compatible server (and chat page) for a model and its adapters."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import typer

from apps.commands.generate import (
    CHAT_TEMPLATE_HELP,
    KV_BITS_HELP,
    KV_GROUP_SIZE_HELP,
    NUM_DRAFT_TOKENS_HELP,
    QUANTIZED_KV_START_HELP,
    check_prompt_cache_flags,
)
from apps.process import keep_torch_out
from elm_spec import ElmError

API_KEY_ENV = "ELM_API_KEY"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model: Path = typer.Option(..., "--model", help="Model directory (plain or quantized)."),
        adapter_path: list[Path] = typer.Option(
            [], "--adapter-path", help="Adapter directory; repeat to serve several (the first "
            "is the default model; requests pick one by name with 'model' or 'adapter')."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
        port: int = typer.Option(8080, "--port", help="Port to listen on."),
        api_key: str = typer.Option(None, "--api-key", envvar=API_KEY_ENV,
                                    help=f"Require 'Authorization: Bearer KEY' (or ${API_KEY_ENV})."),
        chat_template: str = typer.Option(None, "--chat-template", help=CHAT_TEMPLATE_HELP),
        max_tokens: int = typer.Option(512, "--max-tokens", help="Default max_tokens of a request."),
        temp: float = typer.Option(0.0, "--temp", help="Default temperature of a request."),
        max_batch: int = typer.Option(8, "--max-batch", help="Requests decoded together."),
        max_queue: int = typer.Option(16, "--max-queue",
                                      help="Requests waiting beyond --max-batch before 503."),
        max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="Largest request body."),
        prompt_cache_size: int = typer.Option(10, "--prompt-cache-size",
                                              help="KV caches kept for prompt-prefix reuse."),
        prefill_step_size: int = typer.Option(2048, "--prefill-step-size",
                                              help="Prompt tokens processed at a time."),
        draft_model: Path = typer.Option(
            None, "--draft-model", help="A smaller model with the same tokenizer drafting tokens "
            "(speculative decoding). Requests are then decoded one at a time, as mlx_lm.server "
            "does (batched decoding cannot use a draft); response_format and "
            "repetition_penalty are refused."),
        num_draft_tokens: int = typer.Option(3, "--num-draft-tokens", help=NUM_DRAFT_TOKENS_HELP),
        kv_bits: int = typer.Option(None, "--kv-bits", help=KV_BITS_HELP + " Requests are then "
                                    "decoded one at a time (batched decoding cannot quantize)."),
        kv_group_size: int = typer.Option(64, "--kv-group-size", help=KV_GROUP_SIZE_HELP),
        quantized_kv_start: int = typer.Option(5000, "--quantized-kv-start",
                                               help=QUANTIZED_KV_START_HELP),
        prompt_cache_file: Path = typer.Option(
            None, "--prompt-cache-file", help="A prompt cache saved by elm generate "
            "--save-prompt-cache (for the model or one of the adapters): every request whose "
            "prompt begins as the cached one starts from it, for the whole run."),
    ) -> None:
        """Serve a model over an OpenAI-compatible HTTP API, with a chat page at /."""
        keep_torch_out()
        import uvicorn

        from apps.serve.app import ServerSettings, build_app
        from elm_mlx.generate import check_draft_options, check_kv_options, load_draft
        from elm_mlx.serving import Engine, Speedups, load_saved_prefix, load_served_models

        for name, value in (("--max-batch", max_batch), ("--max-tokens", max_tokens),
                            ("--max-body-bytes", max_body_bytes)):
            if value < 1:
                raise ElmError(f"{name} must be at least 1, got {value}")
        if max_queue < 0:
            raise ElmError(f"--max-queue must be at least 0, got {max_queue}")
        check_kv_options(kv_bits, kv_group_size, quantized_kv_start)
        if draft_model is not None:
            check_draft_options(num_draft_tokens)
            if kv_bits is not None:
                raise ElmError("--kv-bits does not combine with --draft-model in elm serve")
        check_prompt_cache_flags(prompt_cache_file, draft_model=draft_model)
        if not is_loopback(host) and api_key is None:
            typer.echo(f"warning: serving on {host} without --api-key: anyone who can reach "
                       "this address can use the model", err=True)
        models = load_served_models(model, adapter_path, chat_template)
        base = models[next(name for name, served in models.items() if served.parent is None)]
        check_kv_options(kv_bits, kv_group_size, quantized_kv_start, base.model.spec.head_dim)
        draft = None if draft_model is None else load_draft(draft_model, model, base.model,
                                                            base.tokenizer)
        saved = None if prompt_cache_file is None else load_saved_prefix(
            prompt_cache_file, models, model, adapter_path, kv_bits, kv_group_size)
        speedups = Speedups(draft, num_draft_tokens, kv_bits, kv_group_size, quantized_kv_start)
        engine = Engine(models, max_batch=max_batch, max_queue=max_queue,
                        prompt_cache_size=prompt_cache_size, prefill_step_size=prefill_step_size,
                        speedups=speedups, saved_prefix=saved).start()
        settings = ServerSettings(api_key=api_key, max_body_bytes=max_body_bytes,
                                  default_max_tokens=max_tokens, default_temp=temp)
        if saved is not None:
            typer.echo(f"prompt cache: {len(saved.tokens)} tokens from {prompt_cache_file} "
                       f"for {saved.model}")
        typer.echo(f"serving {', '.join(models)} on http://{host}:{port} (pid {os.getpid()})")
        try:
            uvicorn.run(build_app(engine, settings), host=host, port=port, log_level="warning")
        finally:
            engine.close()
