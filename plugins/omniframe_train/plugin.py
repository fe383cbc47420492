"""Plugin hooks of omniframe_train: the ``omniframe train`` command."""

from __future__ import annotations

from typing import TYPE_CHECKING

from omniframe import hookimpl

if TYPE_CHECKING:
    import click


@hookimpl
def register_commands(cli: click.Group) -> None:
    """Add ``omniframe train RECIPE`` (torch is imported only when it runs)."""
    from omniframe_train.cli import train_command

    cli.add_command(train_command)
