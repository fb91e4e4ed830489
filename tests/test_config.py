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


@dataclass
class Bounded:
    size: int = field(default=448, metadata={"min": 14, "max": 4096})
    quality: int = field(default=90, metadata={"min": 1, "max": 100})
    memory: str = field(default="1GB", metadata={"bytes": True, "min": 1})
    kind: str = field(default="wap", metadata={"choices": ("wap", "avg")})
    factors: tuple[int, ...] = field(default=(4, 2, 2), metadata={"min": 1})
    timeout: Optional[float] = field(default=None, metadata={"min": 1})
    low: float = 1.0
    high: float = 4.0

    def check(self):
        if self.low > self.high:
            raise ConfigError("low above high")


@pytest.mark.parametrize("flags, message", [
    (["--size", "0"], "--size: 0 is below its minimum 14"),
    (["--quality", "101"], "--quality: 101 is above its maximum 100"),
    (["--memory", "lots"], "--memory: 'lots' is not a size"),
    (["--memory", "0"], "--memory: 0 is below its minimum 1"),
    (["--kind", "max"], "--kind: 'max' is not one of wap, avg"),
    (["--factors", "4,0,2"], "--factors: 0 is below"),
    (["--timeout", "nan"], "--timeout: nan is not a finite number"),
    (["--low", "5"], "low above high"),
])
def test_bad_values_are_one_line_and_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Bounded, flags)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("text, message", [
    (None, "cannot read it"), ("size: [1, 2\n", "not valid YAML"), ("- 1\n- 2\n", "expected a mapping"),
])
def test_a_missing_unparsable_or_non_mapping_yaml_is_a_config_error(tmp_path, text, message, capsys):
    y = tmp_path / "c.yaml"
    if text is not None:
        y.write_text(text)
    with pytest.raises(SystemExit) as e:
        parse_config(Bounded, ["--config", str(y)])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert parse_config(Bounded, ["--timeout", "none"]).timeout is None    # bounds skip unset optionals


def test_every_extract_value_is_checked_before_the_output_is_touched(tmp_path, capsys):
    from jobs.extract import main

    out = tmp_path / "store"
    base = ["--input", str(tmp_path), "--output", str(out), "--teacher", str(tmp_path / "no-teacher")]
    for flags in (["--size", "0"], ["--chunk-clips", "0"], ["--shard-bytes", "-1"], ["--jpeg-quality", "0"],
                  ["--frames-per-forward", "0"], ["--batch-size", "0"], ["--decode-memory", "x"],
                  ["--decode-timeout", "0"], ["--zarr-shard-clips", "0"], ["--fps", "4-1"], ["--views", "0"],
                  ["--format", "parquet"], ["--teacher-device", "tpu"], ["--max-clips-per-view", "0"]):
        assert main(base + flags) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flags[0] in err[0], (flags, err)
        assert not out.exists(), flags


def test_a_dash_splits_number_pairs_but_not_names():
    @dataclass
    class Lists:
        fps: tuple[float, float] = (1.0, 4.0)
        variants: tuple[str, ...] = ("eager",)

    cfg = parse_config(Lists, ["--fps", "2-3", "--variants", "compile-fp8"])
    assert cfg.fps == (2.0, 3.0) and cfg.variants == ("compile-fp8",)
    assert parse_config(Lists, ["--variants", "a-b,c"]).variants == ("a-b", "c")


@pytest.mark.parametrize("module, argv", [
    ("lma.finetune", ["--student", "s", "--llm", "l", "--data", "d", "--lr", "0"]),
    ("lma.finetune", ["--student", "s", "--llm", "l", "--data", "d", "--projector", "linear"]),
    ("lma.generate", ["--model", "m", "--video", "v.mp4", "--question", "q", "--max-new-tokens", "0"]),
    ("jobs.train_student", ["--data", "d", "--ray-workers", "0"]),
    ("jobs.lma_finetune", ["--student", "s", "--llm", "l", "--data", "d", "--max-failures", "-1"]),
])
def test_every_job_checks_its_config_before_touching_its_output(module, argv, tmp_path):
    """The same one-line error and exit status 2 from every entry point, with no output written."""
    import subprocess
    import sys

    out = tmp_path / "out"
    flags = argv if module == "lma.generate" else [*argv, "--output", str(out)]
    result = subprocess.run([sys.executable, "-m", module, *flags], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "error" in result.stderr
    assert not out.exists()
