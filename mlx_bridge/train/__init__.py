"""Training with MLX (imports mlx and mlx-lm: the `train` extra).

    trainer.py     MLXTrainer: load, adapt, train, evaluate, save
    config.py      TrainConfig (every setting, defaults, checks, YAML)
    data.py        records from files/dirs/hub, format detection and checks, seeded split
    templates.py   records -> tokens + exact loss mask (chat template, alpaca, plain, text)
    dataset.py     the two above together, with the manifest's dataset section
    batching.py    length-bucketed batches, resumable stream
    model.py       base model via mlx-lm, LoRA/DoRA/full setup, gradient checkpointing
    step.py        loss, optimizer, schedule, compiled step with exact gradient accumulation
    checkpoint.py  the checkpoint directory (mlx-lm adapter layout + manifest + resume state)
    golden.py      probes: golden MLX outputs saved with each checkpoint
    log.py         progress bar, training_log.jsonl, loss.png
    cli.py         `mlx-bridge train`
"""
