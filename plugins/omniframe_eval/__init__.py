"""omniframe evaluation harness: A/B pipelines on the same audio, one report.

``omniframe eval configs/eval/ab.yaml`` runs every pipeline of an evaluation config over one
dataset and writes per-item records (JSONL) and a report (markdown, JSON, PNG plots).
"""

from __future__ import annotations

__all__ = ["EvalItem"]

from omniframe_eval.items import EvalItem
