"""Combining the members' class probabilities into one answer, and the response JSON.

Pure functions on numpy arrays, so voting is tested on constructed cases without a server.

- soft voting: the mean of the members' probabilities; ``confidence`` is that mean.
- hard voting: each member votes for its top-1 label; the label with most votes wins, a tie
  goes to the tied label with the highest mean probability; ``confidence`` is the winner's
  share of the votes (``top_k`` ranks labels the same way: votes, then mean probability).
A single model is not a vote: ``confidence`` is its own probability."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable), returned as float32."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def soft_vote(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, C) member probabilities -> (scores (C,), ranking of class indices, best first)."""
    scores = probs.astype(np.float64).mean(axis=0)
    order = np.lexsort((np.arange(len(scores)), -scores))  # ties: lower class index first
    return scores, order


def hard_vote(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, C) member probabilities -> (vote shares (C,), ranking: votes, then mean probability)."""
    members, classes = probs.shape
    votes = np.bincount(probs.argmax(axis=1), minlength=classes).astype(np.float64)
    mean = probs.astype(np.float64).mean(axis=0)
    order = np.lexsort((np.arange(classes), -mean, -votes))
    return votes / members, order


def combine(probs: np.ndarray, voting: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ranking for one image: ``probs`` is (M, C); M == 1 needs no vote."""
    if probs.shape[0] == 1 or voting == "soft":
        return soft_vote(probs)
    if voting == "hard":
        return hard_vote(probs)
    raise ValueError(f"unknown voting {voting!r} (soft or hard)")


def prediction(probs: np.ndarray, classes: Sequence[str], *, voting: str, top_k: int, model: str) -> dict[str, Any]:
    """The response for one image, as the contract gives it:
    ``{"label", "class_index", "confidence", "top_k": [{"label", "confidence"}], "model"}``
    plus ``"votes"`` (each member's label, in ``SERVE_MODELS`` order) for an ensemble."""
    scores, order = combine(probs, voting)
    best = int(order[0])
    result: dict[str, Any] = {
        "label": classes[best],
        "class_index": best,
        "confidence": float(scores[best]),
        "top_k": [{"label": classes[int(i)], "confidence": float(scores[int(i)])} for i in order[:top_k]],
        "model": model,
    }
    if probs.shape[0] > 1:
        result["votes"] = [classes[int(i)] for i in probs.argmax(axis=1)]
    return result
