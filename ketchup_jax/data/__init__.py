"""Data: task registry, embedded tasks, tokenisers and batching.

Nothing here imports or calls a model; the pipeline hands a model what
:mod:`ketchup_jax.data.batching` produces.
"""
from ketchup_jax.data.tasks import SPLITS, Task, get_task, split_of, task_names

__all__ = ["SPLITS", "Task", "get_task", "split_of", "task_names"]
