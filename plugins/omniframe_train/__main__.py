"""``python -m omniframe_train RECIPE [--set k=v]``: the entry torchrun starts."""

from __future__ import annotations

from omniframe_train.cli import train_command

if __name__ == "__main__":
    train_command.main(prog_name="omniframe train")
