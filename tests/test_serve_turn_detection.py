"""turn_detection in session.update: any JSON a client sends is either taken (and reported in
a shape that parses back to itself) or refused with a ProtocolError naming the field, never
another exception."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from omniframe.serve.protocol import SEMANTIC_EAGERNESS, ProtocolError, SessionConfig

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=6)

FIELDS = ["type", "eagerness", "threshold", "prefix_padding_ms", "silence_duration_ms",
          "create_response", "interrupt_response"]


def _update(cfg: SessionConfig, td: Any) -> dict[str, Any]:
    return cfg.parse_update({"type": "realtime", "audio": {"input": {"turn_detection": td}}})


@given(st.dictionaries(st.sampled_from(FIELDS),
                       json_values | st.sampled_from(["server_vad", "semantic_vad", "low",
                                                      "high", "auto", "medium"]),
                       max_size=len(FIELDS)))
def test_any_turn_detection_is_taken_or_refused_clearly(td: dict[str, Any]) -> None:
    cfg = SessionConfig(model="m")
    try:
        out = _update(cfg, td)["turn_detection"]
    except ProtocolError as exc:
        assert exc.param is not None and exc.param.startswith("turn_detection")
        return
    assert out["type"] in ("server_vad", "semantic_vad")
    if out["type"] == "semantic_vad":
        assert out["eagerness"] in SEMANTIC_EAGERNESS
        assert set(out) == {"type", "eagerness", "create_response", "interrupt_response"}
    cfg.apply({"turn_detection": out})
    assert _update(cfg, dict(out))["turn_detection"] == out  # reported shape parses to itself


def test_switching_kinds_starts_from_that_kinds_defaults() -> None:
    cfg = SessionConfig(model="m")
    cfg.apply(_update(cfg, {"type": "server_vad", "silence_duration_ms": 900}))
    sem = _update(cfg, {"type": "semantic_vad", "eagerness": "high"})["turn_detection"]
    assert sem == {"type": "semantic_vad", "eagerness": "high", "create_response": True,
                   "interrupt_response": True}
    cfg.apply({"turn_detection": sem})
    back = _update(cfg, {"type": "server_vad"})["turn_detection"]
    assert back["silence_duration_ms"] == 500 and back["type"] == "server_vad"


@pytest.mark.parametrize("bad", [[1], {"a": 1}, 3, "sometimes", True])
def test_bad_eagerness_is_refused(bad: Any) -> None:
    with pytest.raises(ProtocolError, match="eagerness must be one of") as exc:
        _update(SessionConfig(model="m"), {"type": "semantic_vad", "eagerness": bad})
    assert exc.value.param == "turn_detection.eagerness"
