"""Secrets stay out of logs and messages; Kafka and ClickHouse credentials are checked at start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fleetscope import cli, config
from fleetscope.config import AgentSettings, ConfigError, IngestSettings, MigrateSettings, QuerySettings
from fleetscope.credentials import Secret, mask_dsn, read_secret_file, scrub
from tests.support.tls import make_pki


def build(cls: type, argv: list[str], env: dict[str, str] | None = None) -> object:
    args = vars(cli.parser().parse_args(argv))
    args.pop("command")
    args.pop("sql", None)
    return config.build(cls, args, env or {})


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("http://u:pw@h:8123/fleet", "http://u:***@h:8123/fleet"),
        ("https://u:p%40ss@h/db", "https://u:***@h/db"),
        ("http://u:p@ss@h/db", "http://u:***@h/db"),  # an unescaped @ in the password
        ("http://:pw@h", "http://:***@h"),
        ("http://u@h:8123", "http://u@h:8123"),
        ("http://h:8123/db?password=pw&x=1", "http://h:8123/db?password=***&x=1"),
        ("chdb:///data/store", "chdb:///data/store"),
        ("http://[::1:8123", "***"),  # not parseable: nothing of it is shown
    ],
)
def test_mask_dsn(dsn: str, shown: str) -> None:
    assert mask_dsn(dsn) == shown


def test_scrub_masks_url_passwords_and_known_secrets() -> None:
    text = "connect http://bob:hunter2@db:8123 failed; server said hunter2 is wrong; pw"
    assert scrub(text, ["hunter2", "pw"]) == "connect http://bob:***@db:8123 failed; server said *** is wrong; pw"


def test_a_secret_never_shows_in_a_repr() -> None:
    s = build(IngestSettings, ["ingest", "--brokers", "k:9092", "--clickhouse", "http://h:8123"],
              {"FLEETSCOPE_CLICKHOUSE_PASSWORD": "ch-pw-1234"})  # fmt: skip
    assert s.clickhouse_secret() == "ch-pw-1234"
    assert "ch-pw-1234" not in repr(s) and "'***'" in repr(s)
    assert repr(Secret("")) == "''" and f"{Secret('x')}" == "x"


def test_secret_file_first_line(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("line-one\nline-two\n")
    assert read_secret_file("k", f) == "line-one"
    f.write_text("")
    with pytest.raises(ValueError, match=r"k: .* is empty"):
        read_secret_file("k", f)
    with pytest.raises(ValueError, match="cannot read"):
        read_secret_file("k", tmp_path / "missing")


def test_bad_dsn_error_does_not_echo_the_password() -> None:
    with pytest.raises(ConfigError) as e:
        build(MigrateSettings, ["migrate", "--clickhouse", "mysql://u:hunter2@h/db"])
    assert "hunter2" not in str(e.value) and "mysql://u:***@h/db" in str(e.value)


def test_clickhouse_password_from_file_or_environment(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    s = build(MigrateSettings, ["migrate", "--clickhouse", "http://u@h:8123", "--clickhouse-password-file", str(f)])
    assert s.clickhouse_secret() == "from-file"
    q = build(QuerySettings, ["query", "--clickhouse", "http://u@h:8123", "SELECT 1"],
              {"FLEETSCOPE_CLICKHOUSE_PASSWORD": "from-env"})  # fmt: skip
    assert q.clickhouse_secret() == "from-env"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--clickhouse", "http://u:a@h"], {"FLEETSCOPE_CLICKHOUSE_PASSWORD": "b"}, "drop the password from the DSN"),
        (["--clickhouse", "chdb:///x"], {"FLEETSCOPE_CLICKHOUSE_PASSWORD": "b"}, "takes no password"),
        (["--clickhouse", "http://h", "--clickhouse-password-file", "/nonexistent"], {}, "cannot read /nonexistent"),
    ],
)
def test_clickhouse_password_mistakes(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(MigrateSettings, ["migrate", *argv], env)


AGENT = ["agent", "--brokers", "k:9093"]


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--kafka-ssl-cafile", "/etc/hostname"], {}, "kafka_ssl_cafile: is set, but kafka_security_protocol is "
         "PLAINTEXT, which does not use TLS"),
        (["--kafka-sasl-username", "a"], {}, "kafka_sasl_username: is set, but kafka_security_protocol is PLAINTEXT"),
        (["--kafka-security-protocol", "SASL_SSL"], {}, "kafka_sasl_username: required"),
        (["--kafka-security-protocol", "SASL_SSL", "--kafka-sasl-username", "a"], {}, "kafka_sasl_password: required"),
        (["--kafka-security-protocol", "sasl_plaintext", "--kafka-sasl-username", "a", "--kafka-sasl-mechanism",
          "PLAIN"], {"FLEETSCOPE_KAFKA_SASL_PASSWORD": "p"}, "PLAIN over SASL_PLAINTEXT sends the password in clear"),
        (["--kafka-security-protocol", "SSL", "--kafka-ssl-cafile", "/etc/hostname"], {},
         "kafka_ssl_cafile: cannot use /etc/hostname as CA certificates"),
        (["--kafka-security-protocol", "SSL", "--kafka-ssl-keyfile", "/k"], {}, "needs kafka_ssl_certfile"),
        (["--kafka-security-protocol", "TLS"], {}, "must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
    ],
)  # fmt: skip
def test_kafka_security_mistakes_fail_at_start(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build(AgentSettings, AGENT + argv, env)


def test_kafka_tls_settings_build_a_client_context(tmp_path: Path) -> None:
    from fleetscope.kafka_security import client_options, describe

    pki = make_pki(tmp_path)
    pw = tmp_path / "pw"
    pw.write_text("sasl-pw\n")
    s = build(AgentSettings, [
        *AGENT, "--kafka-security-protocol", "SASL_SSL", "--kafka-ssl-cafile", str(pki.ca_cert),
        "--kafka-ssl-certfile", str(pki.client_cert), "--kafka-ssl-keyfile", str(pki.client_key),
        "--kafka-sasl-username", "agent", "--kafka-sasl-password-file", str(pw),
    ])  # fmt: skip
    opts = client_options(s)
    assert opts["security_protocol"] == "SASL_SSL" and opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert opts["sasl_plain_username"] == "agent" and opts["sasl_plain_password"] == "sasl-pw"
    assert opts["ssl_context"].check_hostname
    assert describe(s) == "SASL_SSL as agent (SCRAM-SHA-512)"
    pw.write_text("rotated\n")  # read again for every new client
    assert client_options(s)["sasl_plain_password"] == "rotated"
    with pytest.raises(ConfigError, match="kafka_ssl_certfile: cannot use"):
        build(AgentSettings, [*AGENT, "--kafka-security-protocol", "SSL", "--kafka-ssl-certfile", str(pki.client_cert),
                              "--kafka-ssl-keyfile", str(pki.broker_key)])  # fmt: skip


def test_cli_config_error_hides_the_secret() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fleetscope", "ingest", "--brokers", "k:1", "--clickhouse", "http://u:topsecret@h:1",
         "--clickhouse-password", "other"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "topsecret" not in out.stderr and "other" not in out.stderr and "http://u:***@h:1" in out.stderr
