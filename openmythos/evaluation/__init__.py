"""Evaluation: validation loss, bits per byte and loss per test-time depth."""

from openmythos.evaluation.perplexity import (
    autocast,
    bits_per_byte,
    depth_table,
    eval_batches,
    evaluate,
    evaluate_loss,
    loss_per_depth,
    perplexity,
    scored_targets,
)

__all__ = ["autocast", "bits_per_byte", "depth_table", "eval_batches", "evaluate", "evaluate_loss", "loss_per_depth",
           "perplexity", "scored_targets"]
