"""Fine-tuning: LoRA and QLoRA of the whole multimodal model (text, image, audio, video) in one pass.

data.py reads a data directory into Samples (a PreparedPrompt plus the positions the loss reads); lora.py puts
low-rank adapters on chosen projections and saves/loads them in PEFT's format; train.py runs the training loop.
"""
