"""ketchup_jax: RL-based knowledge distillation of text generators with K-step returns.

A frozen teacher LM scores a student LM's rollouts; its logits, read as Q-values,
induce per-token rewards, and the student is trained by policy gradient on K-step
returns (KETCHUP, arXiv 2504.19024; K = 1 is LLMR).
"""

__version__ = "0.1.0"
