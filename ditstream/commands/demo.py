"""``ditstream train-demo``.

Only typer is imported at module level (``ditstream --help`` stays fast); torch and the training
code are imported inside the commands.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add ``train-demo`` to the main app."""

    @app.command("train-demo")
    def train_demo_cmd(
        out: str = typer.Option("", help="Output folder (default: the packaged engine/assets/demo)."),
        seed: int = typer.Option(0, help="Seed for data, initialisation and sampling."),
        device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda."),
        threads: int = typer.Option(1, help="CPU threads; 1 is fastest on a busy 2-core machine."),
        workdir: str = typer.Option("", help="Checkpoint folder; a rerun resumes after the last finished stage."),
        scale: float = typer.Option(1.0, help="Multiply every stage's step count (0.05 for a smoke run)."),
        lora_only: bool = typer.Option(False, "--lora-only", help="Only train the demo LoRA 'swap' (shape and "
                                       "background colours swapped) on the model already at --out, into its loras/."),
    ) -> None:
        """Reproduce the demo model from scratch: autoencoder → flow teacher → one-step student → demo LoRA."""
        from dataclasses import replace
        from pathlib import Path

        from ditstream.engine.demo.config import TrainConfig
        from ditstream.engine.demo.lora import LoraTrainConfig, train_swap_lora
        from ditstream.engine.demo.recipe import train_demo
        from ditstream.engine.loader import DEMO_MODEL_DIR

        lora_steps = max(1, int(LoraTrainConfig().steps * scale))
        if lora_only:
            model = Path(out) if out else DEMO_MODEL_DIR
            path = train_swap_lora(model, model / "loras", LoraTrainConfig(seed=seed, threads=threads, steps=lora_steps))
            typer.echo(f"saved {path}")
            return

        cfg = TrainConfig(seed=seed, device=device, threads=threads)
        if scale != 1.0:
            cfg = replace(cfg, **{k: max(1, int(getattr(cfg, k) * scale)) for k in
                                  ("ae_steps", "decoder_steps", "teacher_steps", "pairs", "student_steps")})
        path = train_demo(out or DEMO_MODEL_DIR, cfg, workdir=workdir or None, lora_steps=lora_steps)
        typer.echo(f"saved {path}")
