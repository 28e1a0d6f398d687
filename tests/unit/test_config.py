"""Settings resolve CLI > environment > file > default, and bad values name their key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fleetscope import cli, config
from fleetscope.config import AgentSettings, ConfigError, IngestSettings, QuerySettings


def build(cls: type, argv: list[str], env: dict[str, str] | None = None):
    args = vars(cli.parser().parse_args(argv))
    args.pop("command")
    args.pop("sql", None)
    return config.build(cls, args, env or {})


def test_precedence_cli_env_file_default(tmp_path: Path) -> None:
    f = tmp_path / "fs.yaml"
    f.write_text("brokers: [file:1, file:2]\nbatch_max_rows: 7\nargs_max: 100\n")
    env = {"FLEETSCOPE_CONFIG": str(f), "FLEETSCOPE_BATCH_MAX_ROWS": "8"}
    s = build(AgentSettings, ["agent", "--args-max", "64"], env)
    assert s.brokers == ("file:1", "file:2")  # file
    assert s.batch_max_rows == 8  # env beats file
    assert s.args_max == 64  # CLI beats file
    assert s.batch_max_age == 1.0  # default


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["agent"], {}, "brokers: required"),
        (["agent", "--brokers", "nohost"], {}, "brokers: bad value 'nohost' from --brokers"),
        (["agent", "--brokers", "h:1", "--ring-bytes", "5000"], {}, "ring_bytes: 5000 must be a power of 2"),
        (["agent", "--brokers", "h:1"], {"FLEETSCOPE_BATCH_MAX_AGE": "soon"}, "FLEETSCOPE_BATCH_MAX_AGE"),
        (["agent", "--brokers", "h:1", "--args-max", "4096"], {}, "args_max: must be at most 1024"),
        (["ingest", "--brokers", "h:1", "--clickhouse", "mysql://x"], {}, "clickhouse: bad value"),
    ],
)
def test_bad_values_name_the_key(argv: list[str], env: dict[str, str], message: str) -> None:
    cls = cli.COMMANDS[argv[0]][0]
    with pytest.raises(ConfigError, match=message):
        build(cls, argv, env)


def test_unknown_file_key_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "fs.yaml"
    f.write_text("brokerz: x:1\n")
    with pytest.raises(ConfigError, match="brokerz: unknown key"):
        build(IngestSettings, ["ingest", "--config", str(f)])


def test_query_defaults_to_the_local_sql_interface() -> None:
    assert build(QuerySettings, ["query", "SELECT 1"]).dsn == "http://127.0.0.1:8123"
    assert build(QuerySettings, ["query", "--data-dir", "/d", "SELECT 1"]).dsn == "chdb:///d"
    with pytest.raises(ConfigError, match="not both"):
        build(QuerySettings, ["query", "--data-dir", "d", "--clickhouse", "http://h:8123", "SELECT 1"])


def test_sql_interface_beyond_loopback_needs_a_password(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sql_listen: 0\.0\.0\.0:8123 is reachable from other machines"):
        build(cli.COMMANDS["run"][0], ["run", "--sql-listen", "0.0.0.0:8123"])
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    argv = ["serve-sql", "--listen", "0.0.0.0:8123", "--sql-password-file", str(secret)]
    s = build(cli.COMMANDS["serve-sql"][0], argv)
    assert s.sql_secret() == "s3cret"
    assert build(cli.COMMANDS["run"][0], ["run", "--sql-listen", "off"]).sql_listen == "off"


def test_cli_exits_2_with_the_key_and_help_lists_env_and_key() -> None:
    argv = ["agent", "--batch-max-rows", "-3", "--brokers", "h:1"]
    run = subprocess.run([sys.executable, "-m", "fleetscope", *argv], capture_output=True, text=True)
    assert run.returncode == 2
    assert "batch_max_rows: bad value '-3' from --batch-max-rows: must be a positive integer" in run.stderr
    help_text = subprocess.run([sys.executable, "-m", "fleetscope", "ingest", "--help"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    help_text = " ".join(help_text.split())
    assert "FLEETSCOPE_CLICKHOUSE" in help_text and "key clickhouse" in help_text


def test_query_prints_a_table(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fleetscope", "query", "--data-dir", str(tmp_path / "d"),
         "SELECT number AS n, toString(number * 2) AS s FROM numbers(3)"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.splitlines() == ["n  s", "-  -", "0  0", "1  2", "2  4", "(3 rows)"]


def test_every_setting_is_documented() -> None:
    from dataclasses import fields

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    for name, (cls, _) in cli.COMMANDS.items():
        section = doc.split(f"## `fleetscope {name}`")[1].split("\n## ")[0]
        for f in fields(cls):
            row = f"| `--{f.name.replace('_', '-')}` | `{config.env_name(f.name)}` | `{f.name}` |"
            assert row in section, f"docs/configuration.md lacks {name} {f.name}"
