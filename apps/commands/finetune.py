"""`elm finetune --lora`: LoRA, DoRA, QLoRA and full fine-tuning on MLX, resumable; supervised,
or on preference pairs with `--dpo` / `--orpo`."""

from __future__ import annotations

from pathlib import Path

import typer

from apps.process import keep_torch_out


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    def finetune(
        lora: bool = typer.Option(False, "--lora", help="Accepted for mlx_lm.lora's command "
                                  "line; adapters are the default (see --fine-tune-type)."),
        model: str = typer.Option(None, "--model", help="Model directory (plain or quantized)."),
        data: str = typer.Option(None, "--data", help="Directory with train.jsonl, optionally valid.jsonl and test.jsonl."),
        adapter_path: str = typer.Option(None, "--adapter-path", help="Output directory for adapters (default adapters)."),
        config_file: Path = typer.Option(None, "--config", "-c", help="YAML file mirroring these flags."),
        fine_tune_type: str = typer.Option(None, "--fine-tune-type", help="lora, dora or full (default lora)."),
        rank: int = typer.Option(None, "--rank", help="LoRA rank (default 8)."),
        alpha: float = typer.Option(None, "--alpha", help="LoRA alpha; scale = alpha / rank (default scale 20)."),
        dropout: float = typer.Option(None, "--dropout", help="LoRA dropout (default 0)."),
        keys: str = typer.Option(None, "--keys", help="Comma-separated layers to adapt "
                                 "(default qkv_proj,out_proj,proj_1,proj_2)."),
        num_layers: int = typer.Option(None, "--num-layers", help="Blocks to tune, counted from the "
                                       "last; -1 or more than the model has: all (default -1)."),
        iters: int = typer.Option(None, "--iters", help="Training iterations (default 1000)."),
        batch_size: int = typer.Option(None, "--batch-size", help="Rows per batch (default 4)."),
        learning_rate: float = typer.Option(None, "--learning-rate", help="Peak AdamW learning rate (default 1e-5)."),
        weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW weight decay (default 0.01)."),
        lr_schedule: str = typer.Option(None, "--lr-schedule", help="cosine or constant (default cosine)."),
        warmup: int = typer.Option(None, "--warmup", help="Linear warm-up updates (default 0)."),
        steps_per_report: int = typer.Option(None, "--steps-per-report", help="Steps between loss reports (default 10)."),
        steps_per_eval: int = typer.Option(None, "--steps-per-eval", help="Steps between validations (default 200)."),
        save_every: int = typer.Option(None, "--save-every", help="Steps between checkpoints (default 100)."),
        val_batches: int = typer.Option(None, "--val-batches", help="Validation batches, -1 for all (default 25)."),
        test: bool = typer.Option(None, "--test", help="Report test loss and perplexity at the end."),
        test_batches: int = typer.Option(None, "--test-batches", help="Test batches, -1 for all (default 500)."),
        max_seq_length: int = typer.Option(None, "--max-seq-length", help="Longest row in tokens "
                                            "(default: the model's context, max_context_length)."),
        grad_checkpoint: bool = typer.Option(None, "--grad-checkpoint", help="Recompute activations to save memory."),
        grad_accumulation_steps: int = typer.Option(None, "--grad-accumulation-steps",
                                                    help="Batches per optimizer update (default 1)."),
        clear_cache_threshold: int = typer.Option(None, "--clear-cache-threshold",
                                                  help="Bytes of MLX buffer cache kept between "
                                                  "steps (default 0: cleared every step, as mlx-lm)."),
        seed: int = typer.Option(None, "--seed", help="Seed for adapters init, data order, dropout (default 0)."),
        mask_prompt: bool = typer.Option(None, "--mask-prompt/--no-mask-prompt",
                                         help="Train only on completion/assistant tokens (default on)."),
        pack: bool = typer.Option(None, "--pack/--no-pack",
                                  help="Pack rows into full sequences (default on for text data)."),
        chat_template: str = typer.Option(None, "--chat-template", help="Jinja chat template file; "
                                          "'none' disables the shipped OpenELM-instruct fallback."),
        resume: bool = typer.Option(None, "--resume", help="Continue from the newest checkpoint in --adapter-path."),
        dpo: bool = typer.Option(None, "--dpo", help="Direct preference optimization on "
                                 "prompt/chosen/rejected pairs (docs/finetune.md)."),
        orpo: bool = typer.Option(None, "--orpo", help="ORPO on preference pairs: no reference model."),
        beta: float = typer.Option(None, "--beta", help="DPO/ORPO strength: the KL weight, or "
                                   "ORPO's odds-ratio weight (default 0.1)."),
        label_smoothing: float = typer.Option(None, "--label-smoothing", help="DPO: the assumed "
                                              "share of mislabelled pairs, in [0, 0.5) (default 0)."),
        ipo: bool = typer.Option(None, "--ipo", help="DPO: the IPO squared loss instead of the sigmoid."),
        ref_model: str = typer.Option(None, "--ref-model", help="DPO reference model directory "
                                      "(default: the base model with the adapters disabled)."),
        cache_ref_logps: bool = typer.Option(None, "--cache-ref-logps", help="DPO: compute the "
                                             "reference log-probabilities once, before training."),
        upload_repo: str = typer.Option(None, "--upload-repo", help="Publish the adapters to this "
                                        "Hub repo (ORG/NAME), with a model card."),
    ) -> None:
        """Fine-tune a model directory on JSONL data; writes mlx-lm-format adapters."""
        keep_torch_out()
        from elm_mlx.lora.config import build_config
        from elm_mlx.lora.train import finetune as run_finetune

        flags = dict(model=model, data=data, adapter_path=adapter_path, fine_tune_type=fine_tune_type,
                     rank=rank, alpha=alpha, dropout=dropout, keys=keys, num_layers=num_layers,
                     iters=iters, batch_size=batch_size, learning_rate=learning_rate,
                     weight_decay=weight_decay, lr_schedule=lr_schedule, warmup=warmup,
                     steps_per_report=steps_per_report, steps_per_eval=steps_per_eval,
                     save_every=save_every, val_batches=val_batches, test=test,
                     test_batches=test_batches, max_seq_length=max_seq_length,
                     grad_checkpoint=grad_checkpoint, grad_accumulation_steps=grad_accumulation_steps,
                     clear_cache_threshold=clear_cache_threshold, seed=seed, mask_prompt=mask_prompt, pack=pack, chat_template=chat_template,
                     resume=resume, dpo=dpo, orpo=orpo, beta=beta, label_smoothing=label_smoothing,
                     ipo=ipo, ref_model=ref_model, cache_ref_logps=cache_ref_logps)
        config = build_config(config_file, flags)
        run_finetune(config)
        if upload_repo is not None:
            from elm_spec.hub import model_card, publish

            card = model_card(upload_repo, str(config.model), "adapters")
            typer.echo(f"uploaded {config.adapter_path} to "
                       f"{publish(config.adapter_path, upload_repo, card)}")
