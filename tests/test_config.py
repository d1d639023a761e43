"""pipelines/config.py and ``mmrerank validate``: typed config, dotted error paths, no secrets out."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

import pipelines
from operators.contracts import ALLOWED_FORMATS
from pipelines.cli import main
from pipelines.config import Config, ConfigError, load_config, parse_config

# Sentinels: never valid anywhere, easy to grep for.
ACCESS_KEY = "AKIA-cfg-test-MMR-7d2e"
SECRET_KEY = "secret-cfg-test-MMR-41b9aa"
SESSION_TOKEN = "token-cfg-test-MMR-e0e0e0"
SECRETS = (ACCESS_KEY, SECRET_KEY, SESSION_TOKEN)

VALID = """\
root: out
corpus: ../data/corpus
queries: s3://bucket/queries/
qrels: /abs/qrels.tsv
storage:
  endpoint_url: http://127.0.0.1:9000
  region: eu-west-1
ray:
  address: auto
  num_cpus: 4
  env_vars: {FOO: bar}
embed:
  model:
    name: mmr-tiny
    pretrained: null
    seed: 7
  batch_size: 16
  device: cpu
  num_actors: 2
  actor_num_cpus: 1.5
  allowed_formats: [png, jpeg]
"""


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml", sub: str = "conf") -> Path:
    d = tmp_path / sub
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text(text)
    return p


def _base(**extra: Any) -> dict[str, Any]:
    return {"root": "/r", "corpus": "/c", **extra}


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_config(data, "test.yaml")
    return str(ei.value)


def _error_lines(msg: str) -> dict[str, str]:
    """``"  embed.batch_size: Input should be ..."`` lines -> {path: message}."""
    out = {}
    for line in msg.splitlines()[1:]:
        path, _, text = line.strip().partition(": ")
        out[path] = text
    return out


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    """main() reconfigures the root logger; put it back so later tests are unaffected."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    filters = {h: list(h.filters) for h in handlers}
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
            h.filters[:] = filters[h]
        root.setLevel(level)


@pytest.fixture
def cli_caplog(caplog: pytest.LogCaptureFixture, restore_root_logging: None) -> Iterator[pytest.LogCaptureFixture]:
    """caplog that still sees the ``mmrerank`` logger after main() replaced the root handlers."""
    lg = logging.getLogger("mmrerank")
    lg.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        lg.removeHandler(caplog.handler)


# ------------------------------------------------------------------------------------------------
# valid files
# ------------------------------------------------------------------------------------------------


def test_valid_yaml_resolves(tmp_path: Path) -> None:
    p = _write(tmp_path, VALID)
    cfg = load_config(p)
    base = p.parent.resolve()
    assert cfg.root == str(base / "out")
    assert cfg.corpus == str((base / ".." / "data" / "corpus").resolve())
    assert cfg.queries == "s3://bucket/queries"  # URIs are kept, trailing slash dropped
    assert cfg.qrels == "/abs/qrels.tsv"
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000"
    assert cfg.storage.region == "eu-west-1"
    assert cfg.ray.address == "auto" and cfg.ray.num_cpus == 4 and cfg.ray.env_vars == {"FOO": "bar"}
    assert cfg.embed.model.name == "mmr-tiny"
    assert cfg.embed.model.pretrained is None and cfg.embed.model.seed == 7
    assert cfg.embed.batch_size == 16
    assert cfg.embed.device == "cpu"
    assert cfg.embed.num_actors == 2
    assert cfg.embed.actor_num_cpus == 1.5
    assert cfg.embed.allowed_formats == ("PNG", "JPEG")  # upper-cased
    # Defaults fill the rest.
    assert cfg.embed.torch_threads == "auto"
    assert cfg.embed.precision == "auto"


def test_defaults_for_minimal_config(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "root: out\nqueries: q\n"))
    assert cfg.corpus is None
    assert cfg.embed.batch_size == 32
    assert cfg.embed.num_actors == "auto"
    assert cfg.embed.allowed_formats == ALLOWED_FORMATS
    assert cfg.embed.model.name == "mmr-tiny" and cfg.embed.model.pretrained is None
    assert cfg.ray.address is None


def test_relative_paths_are_relative_to_the_file_not_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _write(tmp_path, "root: out\ncorpus: ./in/corpus\nqueries: ../q\nqrels: qrels.tsv\n", sub="a/b")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(p)
    base = (tmp_path / "a" / "b").resolve()
    assert cfg.root == str(base / "out")
    assert cfg.corpus == str(base / "in" / "corpus")
    assert cfg.queries == str(base.parent / "q")
    assert cfg.qrels == str(base / "qrels.tsv")
    assert not cfg.root.startswith(str(elsewhere.resolve()))


def test_absolute_and_file_uris_are_kept(tmp_path: Path) -> None:
    p = _write(tmp_path, f"root: file://{tmp_path}/abs-root\ncorpus: {tmp_path}/c\n")
    cfg = load_config(p)
    assert cfg.root == f"{tmp_path}/abs-root"
    assert cfg.corpus == f"{tmp_path}/c"


def test_shipped_example_configs_validate() -> None:
    configs = sorted((Path(pipelines.__file__).parent / "configs").glob("*.yaml"))
    assert configs, "no example configs shipped"
    for p in configs:
        cfg = load_config(p)
        assert isinstance(cfg, Config)
        assert Path(cfg.root).is_absolute()


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, VALID))
    with pytest.raises(pydantic.ValidationError):
        cfg.embed.batch_size = 1  # type: ignore[misc]


def test_overrides_merge_dotted_keys(tmp_path: Path) -> None:
    p = _write(tmp_path, VALID)
    cfg = load_config(p, {"embed.batch_size": 64, "embed.model.seed": 3, "ray.num_cpus": 8})
    assert cfg.embed.batch_size == 64
    assert cfg.embed.model.seed == 3
    assert cfg.embed.model.name == "mmr-tiny"  # siblings untouched
    assert cfg.ray.num_cpus == 8
    assert cfg.ray.address == "auto"


def test_overrides_are_validated(tmp_path: Path) -> None:
    p = _write(tmp_path, VALID)
    with pytest.raises(ConfigError, match=r"embed\.batch_size"):
        load_config(p, {"embed.batch_size": 0})
    with pytest.raises(ConfigError, match=r"embed\.batchsize: unknown field"):
        load_config(p, {"embed.batchsize": 8})


# ------------------------------------------------------------------------------------------------
# invalid: every message names the dotted field path
# ------------------------------------------------------------------------------------------------


def test_unknown_top_level_key() -> None:
    lines = _error_lines(_error(_base(bogus=1)))
    assert lines == {"bogus": "unknown field"}


@pytest.mark.parametrize(
    "data,path",
    [
        (_base(embed={"batchsize": 3}), "embed.batchsize"),
        (_base(embed={"model": {"nme": "x"}}), "embed.model.nme"),
        (_base(storage={"secret_key": "x"}), "storage.secret_key"),
        (_base(ray={"adress": "auto"}), "ray.adress"),
    ],
)
def test_unknown_nested_key_names_dotted_path(data: dict[str, Any], path: str) -> None:
    lines = _error_lines(_error(data))
    assert lines == {path: "unknown field"}


@pytest.mark.parametrize(
    "embed,path",
    [
        ({"batch_size": "abc"}, "embed.batch_size"),
        ({"batch_size": 0}, "embed.batch_size"),
        ({"batch_size": -5}, "embed.batch_size"),
        ({"actor_num_cpus": -1}, "embed.actor_num_cpus"),
        ({"actor_num_cpus": 0}, "embed.actor_num_cpus"),
        ({"num_actors": 0}, "embed.num_actors"),
        ({"num_actors": "many"}, "embed.num_actors"),
        ({"torch_threads": -2}, "embed.torch_threads"),
        ({"allowed_formats": ["XYZ"]}, "embed.allowed_formats"),
        ({"allowed_formats": ["PNG", "ppm"]}, "embed.allowed_formats"),
        ({"device": "tpu"}, "embed.device"),
        ({"precision": "int4"}, "embed.precision"),
        ({"max_image_pixels": 0}, "embed.max_image_pixels"),
        ({"decode_num_cpus": 0}, "embed.decode_num_cpus"),
        ({"model": {"name": ""}}, "embed.model.name"),
    ],
)
def test_bad_values_name_the_field(embed: dict[str, Any], path: str) -> None:
    msg = _error(_base(embed=embed))
    assert msg.startswith("invalid config test.yaml:")
    paths = list(_error_lines(msg))
    assert paths, msg
    # Union fields add a branch suffix (embed.num_actors.int): the field path must lead it.
    assert all(p == path or p.startswith(path + ".") for p in paths), msg


def test_unknown_format_message_lists_the_offender() -> None:
    msg = _error(_base(embed={"allowed_formats": ["XYZ"]}))
    assert "XYZ" in msg


def test_all_errors_reported_at_once() -> None:
    msg = _error(_base(embed={"batch_size": 0, "actor_num_cpus": -1, "num_actors": 0,
                              "allowed_formats": ["XYZ"]}))
    paths = set(_error_lines(msg))
    assert {"embed.batch_size", "embed.actor_num_cpus", "embed.num_actors", "embed.allowed_formats"} <= paths


def test_ray_bad_values() -> None:
    assert "ray.num_cpus" in _error(_base(ray={"num_cpus": 0}))
    assert "ray.object_store_memory_mb" in _error(_base(ray={"object_store_memory_mb": 1}))


def test_missing_root_names_root() -> None:
    lines = _error_lines(_error({"corpus": "/c"}))
    assert list(lines) == ["root"]
    assert "required" in lines["root"].lower()


def test_blank_root_is_rejected() -> None:
    assert "root" in _error_lines(_error({"root": "  ", "corpus": "/c"}))


def test_neither_corpus_nor_queries() -> None:
    msg = _error({"root": "/r"})
    assert "corpus" in msg and "queries" in msg


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="YAML"):
        load_config(_write(tmp_path, "root: [unclosed\n"))


def test_empty_file_reports_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"root"):
        load_config(_write(tmp_path, ""))


# ------------------------------------------------------------------------------------------------
# secrets
# ------------------------------------------------------------------------------------------------


SECRET_YAML = VALID.replace(
    "  region: eu-west-1\n",
    f"  region: eu-west-1\n  access_key_id: {ACCESS_KEY}\n  secret_access_key: {SECRET_KEY}\n"
    f"  session_token: {SESSION_TOKEN}\n",
)


def _assert_no_secret(text: str) -> None:
    for s in SECRETS:
        assert s not in text


def test_secrets_are_loaded_for_use(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, SECRET_YAML))
    opts = cfg.storage.options()
    assert (opts.access_key_id, opts.secret_access_key, opts.session_token) == SECRETS
    assert opts.endpoint_url == "http://127.0.0.1:9000"


def test_secrets_not_in_dumps_or_repr(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, SECRET_YAML))
    dump = cfg.redacted_dump()
    assert dump["storage"]["endpoint_url"] == "http://127.0.0.1:9000"  # the dump is not just empty
    assert dump["embed"]["batch_size"] == 16
    _assert_no_secret(json.dumps(dump))
    _assert_no_secret(cfg.model_dump_json())
    _assert_no_secret(str(cfg.model_dump()))
    _assert_no_secret(repr(cfg))
    _assert_no_secret(str(cfg))
    _assert_no_secret(repr(cfg.storage))
    _assert_no_secret(repr(cfg.storage.options()))


def test_secret_with_wrong_type_is_not_echoed() -> None:
    msg = _error(_base(storage={"secret_access_key": [SECRET_KEY], "session_token": {"t": SESSION_TOKEN}}))
    assert "storage.secret_access_key" in msg
    _assert_no_secret(msg)


# ------------------------------------------------------------------------------------------------
# mmrerank validate
# ------------------------------------------------------------------------------------------------


def test_validate_prints_resolved_config_without_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cli_caplog: pytest.LogCaptureFixture
) -> None:
    p = _write(tmp_path, SECRET_YAML)
    assert main(["validate", str(p)]) == 0
    out, err = capsys.readouterr()
    data = yaml.safe_load(out)
    assert data["root"] == str(p.parent.resolve() / "out")
    assert data["embed"]["batch_size"] == 16
    assert data["storage"]["region"] == "eu-west-1"
    for text in (out, err, cli_caplog.text):
        _assert_no_secret(text)


def test_validate_set_override(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               restore_root_logging: None) -> None:
    p = _write(tmp_path, SECRET_YAML)
    argv = ["validate", str(p), "--set", "embed.batch_size=64", "--set", "embed.model.seed=5",
            "--set", f"storage.secret_access_key={SECRET_KEY}-override"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    data = yaml.safe_load(out)
    assert data["embed"]["batch_size"] == 64  # an int (YAML-parsed), not the string "64"
    assert data["embed"]["model"]["seed"] == 5
    assert data["embed"]["num_actors"] == 2  # untouched
    _assert_no_secret(out + err)


def test_validate_bad_config_exits_2_and_logs_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cli_caplog: pytest.LogCaptureFixture
) -> None:
    p = _write(tmp_path, SECRET_YAML.replace("batch_size: 16", "batch_size: 0"))
    assert main(["validate", str(p)]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing printed as if it were valid
    errors = [r for r in cli_caplog.records if r.levelno >= logging.ERROR]
    assert errors, "no ERROR record"
    assert any("embed.batch_size" in r.getMessage() for r in errors)
    assert "Traceback" not in err
    _assert_no_secret(cli_caplog.text + err)


def test_validate_bad_override_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cli_caplog: pytest.LogCaptureFixture
) -> None:
    p = _write(tmp_path, VALID)
    assert main(["validate", str(p), "--set", "embed.num_actors=0"]) == 2
    assert main(["validate", str(p), "--set", "embed.batch_size"]) == 2  # no '='
    msgs = [r.getMessage() for r in cli_caplog.records if r.levelno >= logging.ERROR]
    assert any("embed.num_actors" in m for m in msgs)
    assert any("key=value" in m for m in msgs)
    assert capsys.readouterr().out == ""


def test_validate_missing_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cli_caplog: pytest.LogCaptureFixture
) -> None:
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 2
    assert "not found" in cli_caplog.text
    assert capsys.readouterr().out == ""


def test_main_keeps_the_callers_log_handlers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
    restore_root_logging: None,
) -> None:
    """main(argv) is called from tests and notebooks: it must not remove the host's root handlers.

    Today ``_setup_logging`` calls ``logging.basicConfig(force=True)``, which drops every root
    handler (pytest's caplog included), so plain ``caplog`` sees nothing of a failed validate.
    """
    p = _write(tmp_path, VALID.replace("batch_size: 16", "batch_size: 0"))
    assert main(["validate", str(p)]) == 2
    capsys.readouterr()
    assert caplog.handler in logging.getLogger().handlers
    assert "embed.batch_size" in caplog.text
