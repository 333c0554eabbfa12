"""Config: one declaration per key, errors that name file, section, key, value and fix, docs kept honest."""

import os
import re

import pytest

import listener
from conftest import ROOT, write_config


def load(tmp_path, text):
    path = tmp_path / "config.ini"
    path.write_text(text)
    listener._config_cache.clear()
    return listener.load_config(str(path)), str(path)


def test_config_defaults_apply_without_a_file():
    config = listener.load_config(None)
    assert config.secret == () and config.max_body_bytes == 1048576 and config.max_params == 1000
    assert config.max_depth == 64 and config.durability == "full" and config.dedupe_window == 600
    assert config.database == os.path.join(listener.HERE, "data", "events.sqlite3")


def test_config_relative_paths_follow_the_config_file(tmp_path):
    config, _ = load(tmp_path, "[listener]\ndatabase = db/x.sqlite3\n")
    assert config.database == str(tmp_path / "db" / "x.sqlite3")
    assert config.spool_file == str(tmp_path / "data" / "spool.jsonl")


@pytest.mark.parametrize("key, value, fix", [
    ("max_body_bytes", "10k", "1048576 is 1 MiB"),
    ("max_params", "0", "max_input_vars"),
    ("max_depth", "lots", "max_input_nesting_level"),
    ("durability", "sometimes", "full, normal"),
    ("log_level", "loud", "debug, info"),
    ("allowed_ips", "10.0.0.300", "CIDR"),
    ("busy_timeout", "-1", "five seconds"),
    ("secret", "short", "listener.py init"),
])
def test_config_error_names_file_section_key_value_and_fix(tmp_path, key, value, fix):
    with pytest.raises(listener.ConfigError) as e:
        load(tmp_path, "[listener]\n%s = %s\n" % (key, value))
    message = str(e.value)
    assert message.startswith(str(tmp_path / "config.ini") + " [listener] " + key + ": ")
    assert fix in message
    if key == "secret":
        assert value not in message.split(": ", 1)[1]  # a secret is never echoed
    else:
        assert repr(value) in message


def test_config_unknown_key_is_an_error_with_a_suggestion(tmp_path):
    with pytest.raises(listener.ConfigError, match=r"\[listener\] max_body_byte: unknown key.*max_body_bytes"):
        load(tmp_path, "[listener]\nmax_body_byte = 5\n")


def test_config_unknown_section_is_an_error(tmp_path):
    with pytest.raises(listener.ConfigError, match=r"\[listner\]: unknown section"):
        load(tmp_path, "[listner]\nsecret = x\n")


def test_config_unparseable_file_is_an_error(tmp_path):
    with pytest.raises(listener.ConfigError, match=r"line 1: a setting before any section \(hint: put it under \[listener\]\)"):
        load(tmp_path, "secret = outside any section\n")


def test_config_missing_file_named_by_environment_is_an_error(tmp_path):
    with pytest.raises(listener.ConfigError, match="cannot read the config file"):
        listener.load_config(str(tmp_path / "nope.ini"))


def test_config_percent_in_values_is_kept(tmp_path):
    config, _ = load(tmp_path, "[listener]\nlog_file = logs/100%.log\n")
    assert config.log_file.endswith("100%.log")


def test_config_secret_list_for_rotation(tmp_path):
    config, _ = load(tmp_path, "[listener]\nsecret = aaaaaaaaaaaaaaaa1, bbbbbbbbbbbbbbbb2\n")
    assert config.secret == (b"aaaaaaaaaaaaaaaa1", b"bbbbbbbbbbbbbbbb2")


def test_config_is_reloaded_when_the_file_changes(tmp_path):
    path = write_config(tmp_path, max_params="10")
    listener._config_cache.clear()
    assert listener.load_config(path).max_params == 10
    write_config(tmp_path, max_params="20")
    os.utime(path, (1, 1))
    assert listener.load_config(path).max_params == 20


def test_config_path_prefers_wsgi_environ_then_process(monkeypatch):
    monkeypatch.setenv("VBOUT_LISTENER_CONFIG", "/from/process.ini")
    assert listener.config_path({"VBOUT_LISTENER_CONFIG": "/from/environ.ini"}) == "/from/environ.ini"
    assert listener.config_path({}) == "/from/process.ini"


def test_every_key_is_documented_in_config_ini_and_readme():
    config_ini = open(os.path.join(ROOT, "config.ini")).read()
    readme = open(os.path.join(ROOT, "README.md")).read()
    for (section, name) in listener.KEYS:
        pattern = r"^%s =" % name if section != "handler:*" else r"^#   %s: " % name
        assert re.search(pattern, config_ini, re.M), "[%s] %s missing from config.ini" % (section, name)
        assert "`%s`" % name in readme, "%s missing from README.md" % name


def test_every_shipped_handler_key_is_documented():
    config_ini = open(os.path.join(ROOT, "config.ini")).read()
    readme = open(os.path.join(ROOT, "README.md")).read()
    for module in sorted(os.listdir(os.path.join(ROOT, "handlers"))):
        if module.endswith(".py") and module != "__init__.py":
            name = module[:-3]
            loaded = listener._handler_module(name, "test")
            assert "# [handler:%s]" % name in config_ini and "**`%s`**" % name in readme
            section = config_ini.split("# [handler:%s]" % name, 1)[1].split("# ---", 1)[0]
            for key in getattr(loaded, "SETTINGS", {}):
                assert re.search(r"^# %s =" % key, section, re.M), "%s %s missing from config.ini" % (name, key)
                assert "`%s`" % key in readme, "%s %s missing from README.md" % (name, key)


def test_shipped_config_ini_is_the_template():
    """config.ini is generated from the key declarations: python3 -c 'import listener; print(listener.config_template())'"""
    with open(os.path.join(ROOT, "config.ini")) as f:
        assert f.read() == listener.config_template() + "\n"


def test_shipped_config_ini_is_valid_and_at_defaults():
    config = listener.load_config(os.path.join(ROOT, "config.ini"))
    defaults = listener.load_config(None)
    for (section, name) in listener.KEYS:
        if section == "listener":
            assert getattr(config, name) == getattr(defaults, name)
    assert config.handler_defaults == defaults.handler_defaults and config.handlers == []
