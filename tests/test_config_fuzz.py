"""Property tests: whatever a user types, config loading fails only with our ConfigError."""

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtkit.config import Config, describe_fields, load_config
from mtkit.errors import ConfigError

KEYS = [key for key, _, _ in describe_fields()]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=15), st.text(max_size=15)), max_size=4))
def test_overrides_raise_only_config_errors(overrides):
    try:
        cfg = load_config(None, [f"{key}={value}" for key, value in overrides])
    except ConfigError as err:
        assert err.problems and all(isinstance(p, str) and "\n" not in p for p in err.problems)
    else:
        assert isinstance(cfg, Config)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.dictionaries(st.sampled_from([*KEYS, "experiment", "model", "x"]), values, max_size=5))
def test_arbitrary_documents_raise_only_config_errors(tmp_path: Path, document):
    path = tmp_path / "fuzz.yaml"
    nested: dict = {}
    for key, value in document.items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[parts[-1]] = value
    path.write_text(yaml.safe_dump(nested))
    try:
        load_config(path)
    except ConfigError as err:
        assert err.problems


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_config_errors(tmp_path: Path, raw):
    path = tmp_path / "bytes.yaml"
    path.write_bytes(raw)
    try:
        load_config(path)
    except ConfigError as err:
        assert err.problems
