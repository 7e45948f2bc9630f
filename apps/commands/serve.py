"""`elm serve`: an OpenAI-compatible server (and chat page) for a model and its adapters."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import typer

from apps.commands.generate import CHAT_TEMPLATE_HELP
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
    ) -> None:
        """Serve a model over an OpenAI-compatible HTTP API, with a chat page at /."""
        keep_torch_out()
        import uvicorn

        from apps.serve.app import ServerSettings, build_app
        from elm_mlx.serving import Engine, load_served_models

        for name, value in (("--max-batch", max_batch), ("--max-tokens", max_tokens),
                            ("--max-body-bytes", max_body_bytes)):
            if value < 1:
                raise ElmError(f"{name} must be at least 1, got {value}")
        if max_queue < 0:
            raise ElmError(f"--max-queue must be at least 0, got {max_queue}")
        if not is_loopback(host) and api_key is None:
            typer.echo(f"warning: serving on {host} without --api-key: anyone who can reach "
                       "this address can use the model", err=True)
        models = load_served_models(model, adapter_path, chat_template)
        engine = Engine(models, max_batch=max_batch, max_queue=max_queue,
                        prompt_cache_size=prompt_cache_size,
                        prefill_step_size=prefill_step_size).start()
        settings = ServerSettings(api_key=api_key, max_body_bytes=max_body_bytes,
                                  default_max_tokens=max_tokens, default_temp=temp)
        typer.echo(f"serving {', '.join(models)} on http://{host}:{port} (pid {os.getpid()})")
        try:
            uvicorn.run(build_app(engine, settings), host=host, port=port, log_level="warning")
        finally:
            engine.close()
