"""Training: embed mode (frozen backbone + cached embeddings + linear head) and finetune mode."""
