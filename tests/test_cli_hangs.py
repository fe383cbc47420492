"""``omniframe run`` never hangs: stuck stages and Ctrl-C, in a real process (issue 11).

A small script registers a misbehaving LM (``lm: trouble``, its ``how`` option picks the
misbehaviour) and runs the CLI on the torch-free demo pipeline with it in place of the echo LM.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from omniframe.testing import interrupt_when

SCRIPT = textwrap.dedent('''
    import sys, time
    import anyio
    from omniframe import hookimpl
    from omniframe.frames import EndOfTurnFrame, TextDeltaFrame, UserTurnFrame
    from omniframe.stage import Stage, StageOptions

    class Trouble(Stage):
        kind = "lm"
        name = "trouble"
        consumes = (UserTurnFrame,)
        produces = (TextDeltaFrame, EndOfTurnFrame)

        class Options(StageOptions):
            how: str = "ok"

        async def setup(self):
            if self.options.how == "sleep-in-setup":
                print("READY", flush=True)
                time.sleep(60)  # blocks the event loop in C code

        async def process(self, frame):
            how = self.options.how
            print("READY", flush=True)
            if how == "sleep":
                time.sleep(60)
            elif how == "await":
                await anyio.sleep_forever()
            elif how == "thread":
                await self.run_sync(time.sleep, 60)
            elif how == "exit":
                raise SystemExit(3)
            yield TextDeltaFrame(text="fine")
            yield EndOfTurnFrame()

    class Plugin:
        @hookimpl
        def register_stages(self, register):
            register(Trouble)

    from omniframe.plugins import register_plugin
    from omniframe.cli import main
    register_plugin(Plugin(), "trouble")
    main(sys.argv[1:])
''')


def _start(tmp_path: Path, how: str, *extra: str) -> subprocess.Popen[str]:
    script = tmp_path / "run_trouble.py"
    script.write_text(SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), "run", "--set", "pipeline[2].plugin=trouble",
         "--set", f"pipeline[2].options.how={how}",
         "--set", f"pipeline[4].options.path={tmp_path / 'out.wav'}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)


def _wait_ready(proc: subprocess.Popen[str], lines: list[str]) -> None:
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("READY"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    assert ready.wait(60), "".join(lines)


@pytest.mark.parametrize("how", ["sleep", "sleep-in-setup", "await", "thread"])
def test_first_ctrl_c_ends_the_run_within_2_s_whatever_the_stage_does(tmp_path, how):
    script = tmp_path / "run_trouble.py"
    script.write_text(SCRIPT)
    got = interrupt_when(
        [sys.executable, str(script), "run", "--set", "pipeline[2].plugin=trouble",
         "--set", f"pipeline[2].options.how={how}",
         "--set", f"pipeline[4].options.path={tmp_path / 'out.wav'}"],
        "READY", delay=0.3, cwd=tmp_path, ready_timeout=60, exit_timeout=10)
    assert got.code == 130, got.output
    assert got.elapsed < 2.0, got.output
    assert "interrupted" in got.output and "Traceback" not in got.output


@pytest.mark.parametrize(("how", "phase", "what"), [
    ("await", "process", "no progress for"),
    ("thread", "process", "no progress for"),
    ("sleep", "process", "blocks the event loop"),
    ("sleep-in-setup", "setup", "blocks the event loop"),
])
def test_a_stuck_stage_stops_the_run_naming_it(tmp_path, how, phase, what):
    proc = _start(tmp_path, how, "--set", f"pipeline[2].watchdog.{phase}=1")
    lines: list[str] = []
    try:
        _wait_ready(proc, lines)
        code = proc.wait(20)
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.1)
    out = "".join(lines)
    assert code == 1, out
    assert f"stage 'lm' (lm) failed during {phase}: StageStuck" in out, out
    assert what in out and "Traceback" not in out


def test_system_exit_in_a_stage_is_named_with_its_message(tmp_path):
    proc = _start(tmp_path, "exit")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "stage 'lm' (lm) failed during process: SystemExit" in out, out
