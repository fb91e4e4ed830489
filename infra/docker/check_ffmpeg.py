"""Fail unless an ffmpeg binary can do what LiteFrame's decoder asks of it.

    python infra/docker/check_ffmpeg.py [FFMPEG]     # default: the `ffmpeg` on PATH

The image build runs it (a missing codec fails the build, not the first job); tests/test_infra.py
runs it against the binary the test suite decodes with. The list is what the README promises:
H.264, HEVC, VP8, VP9, AV1, MPEG-4 part 2 and (M)JPEG in MP4/MOV, MKV/WebM, AVI and MPEG-TS, zimg
resizing (the `zscale` filter), and the filters, bitstream filter and options that pipeline/video.py
and pipeline/ffmpeg.py pass (the input whitelists among them).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

DECODERS = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg")
FILTERS = ("select", "zscale", "scale", "crop", "pad", "transpose", "hflip", "vflip")
BITSTREAM_FILTERS = ("noise",)
DEMUXERS = ("mov", "matroska", "webm", "avi", "mpegts")
# output options, and the input options pipeline/ffmpeg.py confines every input with
OPTIONS = ("fps_mode", "enc_time_base", "protocol_whitelist", "format_whitelist")


def _run(exe: str, *args: str) -> str:
    return subprocess.run([exe, "-hide_banner", *args], capture_output=True, text=True, timeout=60).stdout


def problems(exe: str) -> list[str]:
    out = []
    decoders = _run(exe, "-decoders")
    # one line per decoder: " V....D h264   H.264 / AVC ..." ; libdav1d is named by codec "(codec av1)"
    names = set(re.findall(r"^ [A-Z.]{6} (\S+)", decoders, re.M))
    codecs = names | set(re.findall(r"\(codec (\S+)\)", decoders))
    out += [f"no {c} decoder" for c in DECODERS if c not in codecs]
    filters = set(re.findall(r"^ [A-Z.|]{2,3} (\S+) ", _run(exe, "-filters"), re.M))
    out += [f"no {f} filter" for f in FILTERS if f not in filters]
    bsfs = set(_run(exe, "-bsfs").split())
    out += [f"no {b} bitstream filter" for b in BITSTREAM_FILTERS if b not in bsfs]
    demuxers = {n for names in re.findall(r"^ D\S*\s+(\S+)", _run(exe, "-demuxers"), re.M) for n in names.split(",")}
    out += [f"no {d} demuxer" for d in DEMUXERS if d not in demuxers]
    full = _run(exe, "-h", "full")
    out += [f"no -{o} option" for o in OPTIONS if not re.search(rf"^\s*-{o}\b", full, re.M)]
    return out


def main(argv: list[str]) -> int:
    exe = argv[0] if argv else shutil.which("ffmpeg")
    if not exe:
        print("check_ffmpeg: no ffmpeg on PATH", file=sys.stderr)
        return 1
    version = _run(exe, "-version").splitlines()[:1]
    found = problems(exe)
    for p in found:
        print(f"check_ffmpeg: {exe}: {p}", file=sys.stderr)
    if not found:
        print(f"check_ffmpeg: ok: {exe}: {version[0] if version else '?'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
