"""``omniframe train RECIPE``: run a training recipe, in this process or under torchrun."""

from __future__ import annotations

import os
import shutil
import sys

import click


@click.command("train")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Processes on this machine: > 1 re-launches itself under torchrun.")
@click.option("--nnodes", type=int, default=1, show_default=True, help="Nodes (torchrun).")
@click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT",
              help="Rendezvous endpoint for several nodes (torchrun c10d).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field, e.g. --set steps=100 --set optim.lr=1e-3.")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
def train_command(recipe: str, nproc: int, nnodes: int, rdzv_endpoint: str | None,
                  overrides: tuple[str, ...], as_json: bool) -> None:
    """Train Mini-Omni per RECIPE (configs/train/stage1.yaml, stage2.yaml, stage3.yaml).

    With --nproc N (and no torchrun environment) this execs
    ``torchrun --nproc_per_node N -m omniframe_train RECIPE ...``; under torchrun every process
    runs the same recipe (DDP by default, FSDP2 with --set distributed.strategy=fsdp2).
    """
    from .recipe import RecipeError, load_recipe

    try:
        rec = load_recipe(recipe, list(overrides))
    except RecipeError as e:
        raise click.ClickException(str(e)) from None
    if (nproc > 1 or nnodes > 1) and "LOCAL_RANK" not in os.environ:
        exe = shutil.which("torchrun")
        cmd = [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]
        cmd += [f"--nproc_per_node={nproc}", f"--nnodes={nnodes}"]
        if nnodes == 1 and not rdzv_endpoint:
            cmd += ["--standalone"]
        elif rdzv_endpoint:
            cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
        else:
            raise click.ClickException("--nnodes > 1 needs --rdzv-endpoint HOST:PORT")
        cmd += ["-m", "omniframe_train", recipe]
        for o in overrides:
            cmd += ["--set", o]
        if as_json:
            cmd.append("--json")
        sys.stdout.flush()
        os.execvp(cmd[0], cmd)
    from .loop import run

    summary = run(rec)
    if as_json and int(os.environ.get("RANK", "0")) == 0:
        import json

        click.echo(json.dumps(summary, default=str))
