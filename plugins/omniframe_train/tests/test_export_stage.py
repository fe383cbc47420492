"""A trained and exported model runs in the Mini-Omni LM stage like the released checkpoint."""

from __future__ import annotations

from pathlib import Path

import anyio
import numpy as np
import pytest
from omniframe_train.loop import run
from omniframe_train.recipe import Recipe

from omniframe.frames import EndOfTurnFrame, FeaturesFrame
from omniframe.testing import make_stage, run_stage

from .conftest import tiny_recipe

pytestmark = pytest.mark.anyio


async def test_exported_folder_runs_in_the_lm_stage(tmp_path: Path, tokenizer_file: Path
                                                    ) -> None:
    from omniframe_mini_omni.stages import MiniOmniLM

    recipe = Recipe.model_validate(tiny_recipe(tmp_path, tokenizer_file, steps=1))
    out = await anyio.to_thread.run_sync(lambda: run(recipe, echo=lambda s: None))
    stage = make_stage(MiniOmniLM, model=out["export"], task="ASR", max_new_tokens=3)
    feats = np.random.default_rng(0).normal(size=(20, 16)).astype(np.float32)
    frames = await run_stage(stage, [FeaturesFrame(features=feats, frame_rate=50.0, turn=1)],
                             timeout=120)
    assert any(isinstance(f, EndOfTurnFrame) for f in frames)
