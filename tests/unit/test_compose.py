"""docker-compose.yml cannot run here (no Docker engine); check it against the CLI instead."""

from __future__ import annotations

from pathlib import Path

import yaml

from fleetscope import cli, config

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_images_and_ports() -> None:
    services = compose()["services"]
    assert set(services) == {"kafka", "clickhouse", "ingester", "agent"}
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    assert "9092:9092" in services["kafka"]["ports"] and "8123:8123" in services["clickhouse"]["ports"]
    agent = services["agent"]
    assert agent["privileged"] is True and agent["pid"] == "host"
    assert "/sys/kernel/btf:/sys/kernel/btf:ro" in agent["volumes"]
    assert (ROOT / services["agent"]["build"] / "Dockerfile").exists()


def test_commands_are_valid_fleetscope_invocations() -> None:
    services = compose()["services"]
    for name, sub in (("ingester", "ingest"), ("agent", "agent")):
        command = services[name]["command"]
        assert command[:2] == ["fleetscope", sub]
        args = vars(cli.parser().parse_args(command[1:]))
        args.pop("command")
        settings = config.build(cli.COMMANDS[sub][0], args, {})
        assert settings.brokers == ("kafka:9092",)
        if sub == "ingest":
            host = settings.clickhouse.split("@")[1].split(":")[0]
            assert host in services and settings.clickhouse == services[name]["environment"]["FLEETSCOPE_CLICKHOUSE"]
        host = settings.brokers[0].split(":")[0]
        assert host in services
