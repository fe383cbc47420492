"""omniframe: real-time speech agents on an async event bus.

The public API. Importing it is cheap: no torch, no model library.
"""

from __future__ import annotations

from omniframe.config import (
    ConfigError,
    PipelineConfig,
    build_pipeline,
    load_config,
    parse_config,
)
from omniframe.frames import (
    AudioCodesFrame,
    AudioFrame,
    ControlFrame,
    DataFrame,
    EndOfStreamFrame,
    EndOfTurnFrame,
    ErrorFrame,
    FeaturesFrame,
    Frame,
    InterruptFrame,
    OutputAudioFrame,
    SpeechEndFrame,
    SpeechStartFrame,
    SystemFrame,
    TextDeltaFrame,
    TranscriptFrame,
    UserTurnFrame,
)
from omniframe.hookspecs import hookimpl
from omniframe.metrics import RunResult, StageMetrics, TurnMetrics
from omniframe.model_uris import ModelNotAvailable, ModelRef, resolve_model
from omniframe.pipeline import Pipeline, PipelineError, StageError, run_pipeline
from omniframe.session import Message, Session
from omniframe.stage import Stage, StageContext, StageOptions

__version__ = "0.1.0"

__all__ = [
    "AudioCodesFrame",
    "AudioFrame",
    "ConfigError",
    "ControlFrame",
    "DataFrame",
    "EndOfStreamFrame",
    "EndOfTurnFrame",
    "ErrorFrame",
    "FeaturesFrame",
    "Frame",
    "InterruptFrame",
    "Message",
    "ModelNotAvailable",
    "ModelRef",
    "OutputAudioFrame",
    "Pipeline",
    "PipelineConfig",
    "PipelineError",
    "RunResult",
    "Session",
    "SpeechEndFrame",
    "SpeechStartFrame",
    "Stage",
    "StageContext",
    "StageError",
    "StageMetrics",
    "StageOptions",
    "SystemFrame",
    "TextDeltaFrame",
    "TranscriptFrame",
    "TurnMetrics",
    "UserTurnFrame",
    "build_pipeline",
    "hookimpl",
    "load_config",
    "parse_config",
    "resolve_model",
    "run_pipeline",
]
