import pytest

from kvchat.config import config_from_args, format_bytes, parse_bytes, parse_duration
from kvchat.errors import InputError


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("800MB", 800 * 10**6), ("1.5 GiB", 3 * 2**29),
     ("1000000", 1_000_000), ("64k", 65536), ("10 b", 10), (4096, 4096)],
)  # fmt: skip
def test_parse_bytes_units(text, nbytes):
    assert parse_bytes(text) == nbytes


@pytest.mark.parametrize("text", ["", "lots", "12 parsecs", "-5MiB", "MiB", "1e9"])
def test_parse_bytes_rejects_with_a_hint(text):
    with pytest.raises(InputError, match="512MiB"):
        parse_bytes(text)


def test_format_bytes():
    assert format_bytes(512 * 2**20) == "512.0 MiB"
    assert format_bytes(100) == "100 B"


def test_environment_fills_in_and_flags_win():
    env = {"KVCHAT_CACHE_BUDGET": "1GiB", "KVCHAT_PORT": "9000", "KVCHAT_SHARE": "yes", "KVCHAT_USAGE_DB": "none"}
    config = config_from_args([], environ=env)
    assert (config.cache_budget_bytes, config.port, config.share, config.usage_db) == (2**30, 9000, True, None)
    assert config.host == "127.0.0.1"  # binds locally unless told otherwise
    assert config_from_args(["--cache-budget", "256MiB"], environ=env).cache_budget_bytes == 256 * 2**20


def test_bad_values_are_input_errors():
    with pytest.raises(InputError):
        config_from_args(["--cache-budget", "huge"], environ={})
    with pytest.raises(InputError):
        config_from_args(["--auth", "nopassword"], environ={})


def test_disk_tier_options_and_their_defaults(tmp_path):
    home = tmp_path / "home"
    config = config_from_args(["--home", str(home)], environ={})
    assert config.disk_path == home / "disk" and config.disk_budget_bytes == 2 * 2**30
    assert (config.persist_sessions, config.session_ttl_s, config.eviction) == (False, None, "lru")
    env = {"KVCHAT_DISK_DIR": str(tmp_path / "d"), "KVCHAT_PERSIST_SESSIONS": "1", "KVCHAT_SESSION_TTL": "30m",
           "KVCHAT_EVICTION": "gdsf", "KVCHAT_CACHE_BUDGET": "auto"}  # fmt: skip
    config = config_from_args([], environ=env)
    assert config.disk_path == tmp_path / "d" and config.persist_sessions and config.session_ttl_s == 1800
    assert config.eviction == "gdsf" and config.cache_budget_bytes is None  # auto: sized at start
    assert config_from_args(["--disk-budget", "0"], environ=env).disk_path is None  # the tier is off


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200), ("off", None)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_bad_disk_options_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="30m"):
        config_from_args(["--session-ttl", "soon"], environ={})
    with pytest.raises(InputError, match="does not exist"):
        config_from_args(["--preset-file", str(tmp_path / "missing.md")], environ={})
    with pytest.raises(SystemExit):  # argparse lists the policies
        config_from_args(["--eviction", "random"], environ={})
