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


HUB = ("format: hub\n    name: wmt/wmt14\n    subset: de-en\n"
       "    src_field: translation.en\n    tgt_field: translation.de\n")


def test_hub_evaluation_corpora_name_their_split(tmp_path):
    """Defaulting valid/test to the train split would evaluate on training data."""
    text = f"data:\n  train:\n    {HUB}  valid:\n    {HUB}  test:\n    {HUB}    split: test\n"
    result = runner.invoke(app, ["config", "check", "-c", str(write(tmp_path, text))])
    assert result.exit_code == 2
    assert result.stderr.startswith("mtkit: error: data.valid.split: required for a hub corpus outside training")
    assert len(result.stderr.splitlines()) == 1  # train defaults to its train split, test names its own
    config = load_config(write(tmp_path, text.replace("valid:\n    ", "valid:\n    split: validation\n    ")))
    assert [config.data.train[0].split, config.data.valid.split, config.data.test.split] == ["train", "validation",
                                                                                                "test"]


def test_check_finds_what_would_fail_later(tmp_path):
    (tmp_path / "a.en").write_text("x\n")
    (tmp_path / "named.tsv").write_text("en\tde\nx\ty\n")
    text = (f"data:\n  train:\n    - src: {tmp_path}/a.en\n      tgt: {tmp_path}/missing.de\n"
            f"    - format: tsv\n      path: {tmp_path}/named.tsv\n      header: true\n      tgt_field: fr\n"
            f"  valid:\n    format: tsv\n    path: {tmp_path}/a.en\n"
            f"  test:\n    format: tsv\n    path: {tmp_path}\n    src_field: '0'\n    tgt_field: '1'\n")
    path = write(tmp_path, text)
    result = runner.invoke(app, ["config", "check", "-c", str(path)])
    assert result.exit_code == 2
    assert "config OK" not in result.output
    assert result.stderr.splitlines() == [  # the columns first: a config that does not load has no files to check
        "mtkit: error: data.valid: format 'tsv' without a header needs 0-based column numbers, not src_field 'src' "
        "and tgt_field 'tgt' (give numbers, or set header: true to use column names)"]
    path.write_text(text.replace("  valid:\n    format: tsv\n", "  valid:\n    format: tsv\n    header: true\n"))
    result = runner.invoke(app, ["config", "check", "-c", str(path)])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"mtkit: error: data.train.0.tgt: {tmp_path}/missing.de: no such file",
        f"mtkit: error: data.train.1.src_field: no column named 'src' in the header of {tmp_path}/named.tsv (en, de)",
        f"mtkit: error: data.train.1.tgt_field: no column named 'fr' in the header of {tmp_path}/named.tsv (en, de)",
        f"mtkit: error: data.valid.src_field: no column named 'src' in the header of {tmp_path}/a.en (x)",
        f"mtkit: error: data.valid.tgt_field: no column named 'tgt' in the header of {tmp_path}/a.en (x)",
        f"mtkit: error: data.test.path: {tmp_path}: not a regular file",
    ]


def test_check_needs_a_config(tmp_path):
    result = runner.invoke(app, ["config", "check"])
    assert result.exit_code == 2
    assert result.stderr == ("mtkit: error: config check: no config given; pass -c FILE "
                             "(and --set KEY=VALUE to override)\n")
    path = write(tmp_path, f"data:\n  train:\n    src: {ROOT}/pyproject.toml\n    tgt: {ROOT}/pyproject.toml\n")
    result = runner.invoke(app, ["config", "check", "-c", str(path)])
    assert result.exit_code == 0 and result.stderr == f"{path}: config OK\n"
    result = runner.invoke(app, ["config", "check", "-c", str(path), "--set", "data.train=[]"])
    assert result.exit_code == 2 and "data.train: no training corpora" in result.stderr


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
