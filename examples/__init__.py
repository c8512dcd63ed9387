"""Runnable training examples (tiny GPT, tiny MoE) for the outer-loop optimizers."""
