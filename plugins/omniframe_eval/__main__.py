"""``python -m omniframe_eval CONFIG ...``: the ``eval`` command without the omniframe CLI."""

from __future__ import annotations

from omniframe_eval.cli import eval_command

if __name__ == "__main__":
    eval_command(prog_name="python -m omniframe_eval")
