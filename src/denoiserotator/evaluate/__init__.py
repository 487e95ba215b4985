"""Evaluation: perplexity over fixed windows and lm-eval zero-shot accuracy."""
