import pytest

from kvchat.config import config_from_args, format_bytes, parse_bytes
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
