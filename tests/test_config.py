"""The config system: strict, typed, every problem at once, through the real CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mtkit.cli import app
from mtkit.config import Config, describe_fields, load_config
from mtkit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_and_file_and_overrides(tmp_path):
    path = write(tmp_path, "tokenizer:\n  vocab_size: 1000\nmodel:\n  size: tiny\n")
    cfg = load_config(path, ["tokenizer.vocab_size=16000", "train.betas=[0.9, 0.99]", "experiment.dir=out"])
    assert cfg.tokenizer.vocab_size == 16000
    assert cfg.train.betas == (0.9, 0.99)
    assert cfg.model.d_model == 64  # filled from the named size
    assert cfg.experiment.dir == Path("out")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train:\n  lr: fast\n", 'train.lr: expected a number, got "fast"'),
        ("model:\n  d_modle: 3\n", "model.d_modle: unknown key (did you mean 'd_model'?)"),
        ("tokenizer:\n  vocab_size: -5\n", "tokenizer.vocab_size: Input should be greater than or equal to 16"),
        ("tokenizer:\n  type: wordpiece\n", "tokenizer.type: expected 'unigram' or 'bpe', got \"wordpiece\""),
        ("trian:\n  lr: 1\n", "trian: unknown key (did you mean 'train'?)"),
        ("model:\n  size: small\n  heads: 5\n", "model: heads (5) must divide d_model (256)"),
        ("data:\n  train:\n    format: text\n    src: a.txt\n", "data.train.0: format 'text' needs tgt"),
        ("decode:\n  beam: 2\n  nbest: 3\n", "decode: nbest (3) cannot exceed beam (2)"),
        ("train:\n  compile: maybe\n", 'train.compile: expected true or false, got "maybe"'),
        ("train:\n  device: gpu0\n", "train.device: expected auto, cpu, cuda or cuda:N, got \"gpu0\""),
    ],
)
def test_each_problem_is_one_line_naming_the_key(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert any(line.startswith(expected) for line in err.value.problems), err.value.problems


def test_all_problems_reported_at_once_with_exit_code_2(tmp_path):
    path = write(tmp_path, "train:\n  lr: fast\n  max_tokens: lots\nmodel:\n  d_modle: 3\n")
    result = runner.invoke(app, ["config", "check", "-c", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3
    assert all(line.startswith("mtkit: error: ") for line in lines)
    assert "Traceback" not in result.output


def test_override_errors_through_cli(tmp_path):
    result = runner.invoke(app, ["config", "show", "--set", "tokenizer.vocab_size=big", "--set", "nokey"])
    assert result.exit_code == 2
    assert "--set 'nokey': expected key.path=value" in result.stderr


@pytest.mark.parametrize(
    "text, expected",
    [
        ("!!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
        ("a: [1, 2\n", "line"),
        ("- 1\n- 2\n", "a config must be a mapping"),
        ("a: " + "[" * 5000 + "]" * 5000, "nested too deeply"),
        (
            'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
            + "".join(f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)),
            "too many YAML aliases",
        ),
    ],
)
def test_hostile_or_broken_yaml_is_refused(tmp_path, text, expected):
    path = write(tmp_path, text)
    result = runner.invoke(app, ["config", "check", "-c", str(path)])
    assert result.exit_code == 2
    assert expected in result.stderr
    assert str(path) in result.stderr


def test_missing_config_file(tmp_path):
    result = runner.invoke(app, ["config", "show", "-c", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "nope.yaml: config file not found" in result.stderr


def test_show_round_trips(tmp_path):
    result = runner.invoke(app, ["config", "show", "--set", "model.size=base"])
    assert result.exit_code == 0
    cfg = Config.model_validate(yaml.safe_load(result.stdout))
    assert cfg.model.d_model == 512


def test_every_field_is_documented():
    rows = describe_fields()
    undocumented = [key for key, _, doc in rows if not doc]
    assert not undocumented
    assert any(key == "data.train.src_field" for key, _, _ in rows)


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    load_config(recipe)


def test_help_is_fast_and_imports_nothing_heavy():
    heavy = "('torch', 'datasets', 'sentencepiece')"
    code = f"import sys, mtkit.cli; print(','.join(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    result = subprocess.run([sys.executable, "-m", "mtkit", "--help"], capture_output=True, text=True, check=True)
    assert "translate" in result.stdout
