"""training_tools: SnapGen training on Hugging Face Accelerate (torch; run as a subprocess).

Stages (``python -m training_tools pretrain|distill|step-distill|finetune CONFIG.json``):
flow-matching pretraining, multi-level knowledge distillation with timestep-aware scaling,
adversarial step distillation, LoRA/full fine-tuning with the base model as teacher.
Modules: config (TrainConfig), data (folders, buckets, caches, resumable batching), flow, losses,
teachers (adapters), discriminator, ema, checkpoint (atomic, pickle-free), estimate (memory/time),
text, models, samples, events (JSON lines), rundir, trainer. See docs/training.md.
Nothing imports this package but its tests; the app starts it as a subprocess.
"""
