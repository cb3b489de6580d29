"""Training: the trainer, its data (corpus, tokenizer) and multi-process launch."""
