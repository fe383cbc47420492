"""``omniframe train`` is registered by the plugin and reports bad recipes clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from omniframe.cli import main

from .conftest import tiny_recipe, write_recipe


def test_train_command_is_registered(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "RECIPE" in out and "--nproc" in out and "--set" in out


def test_bad_recipe_is_reported(tmp_path: Path, tokenizer_file: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    data = tiny_recipe(tmp_path, tokenizer_file, micro_batch=3, global_batch=4)
    with pytest.raises(SystemExit) as e:
        main(["train", str(write_recipe(tmp_path / "r.yaml", data))])
    assert e.value.code != 0
    assert "global_batch=4 must be a multiple of micro_batch=3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(tmp_path / "missing.yaml")])
    assert "recipe not found" in capsys.readouterr().err


def test_train_runs_from_the_cli(tmp_path: Path, tokenizer_file: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, tokenizer_file))
    with pytest.raises(SystemExit) as e:
        main(["train", str(recipe), "--set", "steps=1", "--json"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "step      1/1 loss" in out and '"steps": 1' in out
    assert (tmp_path / "run" / "export" / "lit_model.pth").is_file()
