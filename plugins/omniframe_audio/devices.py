"""Sound-card access through sounddevice (an extra), with errors that say what to install."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

__all__ = ["AudioDeviceError", "import_sounddevice", "pick_device"]


class AudioDeviceError(RuntimeError):
    """No usable sound device, or the library to reach one is missing."""


def import_sounddevice(purpose: str) -> Any:
    """Import sounddevice, turning a missing package or PortAudio into a clear error.

    ``purpose`` names the stage for the message (``"the mic source"``)."""
    try:
        import sounddevice
    except ImportError:
        raise AudioDeviceError(
            f"{purpose} needs the sounddevice package, which is not installed: "
            f"pip install 'omniframe[mic]'. Without a sound card, use the file source "
            f"(plugin: file) and the wav sink instead."
        ) from None
    except OSError as exc:  # sounddevice raises OSError when libportaudio is missing
        raise AudioDeviceError(
            f"{purpose} needs the PortAudio library ({exc}): install it with "
            f"'apt-get install libportaudio2' (Debian/Ubuntu) or 'brew install portaudio' "
            f"(macOS), then pip install 'omniframe[mic]'. Without a sound card, use the file "
            f"source (plugin: file) and the wav sink instead."
        ) from None
    return sounddevice


def pick_device(devices: Sequence[Any], wanted: int | str | None,
                direction: Literal["input", "output"], default: int | None = None) -> int:
    """Choose a device index from ``sounddevice.query_devices()``.

    ``wanted`` is an index, a (case-insensitive) part of a name, or None for ``default`` (the
    system default, when it has channels in ``direction``) or else the first such device."""
    key = f"max_{direction}_channels"
    usable = [i for i, d in enumerate(devices) if int(d.get(key, 0) or 0) > 0]
    if not usable:
        hint = ("connect a microphone, or read a file instead (plugin: file, options.path)"
                if direction == "input" else
                "connect speakers, or write a file instead (plugin: wav, options.path)")
        raise AudioDeviceError(
            f"no audio {direction} device found: sounddevice lists {len(devices)} device(s), "
            f"none with {direction} channels; {hint}"
        )
    listing = "; ".join(f"{i}: {devices[i].get('name', '?')}" for i in usable)
    if wanted is None:
        if default is not None and default in usable:
            return default
        return usable[0]
    if isinstance(wanted, int):
        if wanted in usable:
            return wanted
        raise AudioDeviceError(
            f"audio device {wanted} is not an {direction} device; {direction} devices: {listing}"
        )
    matches = [i for i in usable if wanted.lower() in str(devices[i].get("name", "")).lower()]
    if not matches:
        raise AudioDeviceError(
            f"no {direction} device name contains {wanted!r}; {direction} devices: {listing}"
        )
    return matches[0]
