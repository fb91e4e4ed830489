from dataclasses import dataclass, field
from typing import Optional

import pytest

from pipeline.config import ConfigError, config_hash, load_yaml, parse_config


@dataclass
class Job:
    input: str
    clip_frames: int = 4
    fps: tuple[float, float] = field(default=(1.0, 4.0), metadata={"flag": "fps"})
    formats: tuple[str, ...] = ("webdataset",)
    lr: float = 4e-5
    resume: bool = False
    limit: Optional[int] = None


def test_defaults_yaml_then_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("clip_frames: 8\nlr: 1.0e-3\nformats: [webdataset, zarr]\n")
    cfg = parse_config(Job, ["--input", "x", "--config", str(y), "--fps", "2-3", "--resume", "--limit", "5"])
    assert cfg == Job(input="x", clip_frames=8, fps=(2.0, 3.0), formats=("webdataset", "zarr"),
                      lr=1e-3, resume=True, limit=5)
    assert parse_config(Job, ["--input", "x", "--clip-frames", "2", "--config", str(y)]).clip_frames == 2
    assert parse_config(Job, ["--input", "x", "--formats", "zarr,webdataset"]).formats == ("zarr", "webdataset")
    assert parse_config(Job, ["--input", "x", "--no-resume"]).resume is False


def test_unknown_yaml_key_and_bad_value_are_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("input: x\nclip_frame: 8\n")
    with pytest.raises(ConfigError, match="clip_frame"):
        load_yaml(Job, y)
    with pytest.raises(SystemExit):
        parse_config(Job, ["--input", "x", "--clip-frames", "four"])
    with pytest.raises(SystemExit):
        parse_config(Job, [])  # --input is required


def test_config_hash_is_stable_and_sensitive():
    a, b = Job(input="x"), Job(input="x", clip_frames=8)
    assert config_hash(a) == config_hash(Job(input="x"))
    assert config_hash(a) != config_hash(b)
