"""Plugin hooks of the evaluation harness: the built-in datasets and the ``eval`` command."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from omniframe import hookimpl

if TYPE_CHECKING:
    import click


@hookimpl
def register_datasets(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """spoken_qa (espeak-ng, offline), librispeech (a local folder), manifest (JSONL of local
    audio files) and hf (Hugging Face datasets by name, online)."""
    from omniframe_eval import datasets

    register("spoken_qa", datasets.spoken_qa)
    register("librispeech", datasets.librispeech)
    register("manifest", datasets.manifest)
    register("hf", datasets.hf_dataset)


@hookimpl
def register_commands(cli: click.Group) -> None:
    """``omniframe eval CONFIG``."""
    from omniframe_eval.cli import eval_command

    cli.add_command(eval_command)
