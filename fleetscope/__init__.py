"""fleetscope: fleet telemetry from the kernel (eBPF) through Kafka into ClickHouse."""

__version__ = "0.1.0"
