"""Typed errors for bad inputs. Jobs catch `VideoError` per video, record it as a row of
the store's `errors/` (uri, stage, type, message) and go on; anything else is a bug and fails loudly."""

from __future__ import annotations


class VideoError(Exception):
    """A video that cannot be used. `uri` names the input; `stage` says where it failed."""

    stage = "decode"

    def __init__(self, uri: str, message: str):
        self.uri = str(uri)
        self.message = message
        super().__init__(f"{uri}: {message}")

    def __reduce__(self):  # picklable across Ray workers
        return (type(self), (self.uri, self.message))


class InputNotFoundError(VideoError):
    """Missing or unreadable input (no such file, permission denied, no such S3 key)."""

    stage = "open"


class InputNotAllowedError(VideoError):
    """An input this job may not open: a URI scheme that is not enabled (ftp://, memory://, http://
    unless allowed...). Refused before anything is opened or requested."""

    stage = "open"


class NotAVideoError(VideoError):
    """The input is not a video file: no container ffmpeg knows, a playlist or manifest, an image
    (sequence), or no regular file at all (a FIFO, a device)."""

    stage = "probe"


class NoVideoStreamError(VideoError):
    """A valid container without any video stream (audio-only, subtitles...)."""

    stage = "probe"


class CorruptVideoError(VideoError):
    """Corrupt or truncated stream: decoding failed or returned fewer frames than the plan needs."""


class LimitExceededError(VideoError):
    """An input beyond a limit of `pipeline.video.InputPolicy` or the remote cache (pixels per
    frame, bytes): refused instead of letting one input take a worker's memory or disk."""

    stage = "probe"


class DecodeTimeoutError(VideoError):
    """Probe or decode exceeded its time limit; the ffmpeg process was killed."""


class TooShortError(VideoError):
    """Shorter than one clip while padding is off: not an error of the file, recorded all the same."""

    stage = "plan"
