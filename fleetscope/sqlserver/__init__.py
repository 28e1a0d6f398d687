"""fleetscope's ClickHouse HTTP interface over the embedded engine (`serve-sql`, `run`).

Any ClickHouse HTTP client (clickhouse-connect, clickhouse-go and so Grafana, curl, other
fleetscope processes) can query and insert while one process owns the embedded store.
"""

from fleetscope.sqlserver.server import ServerOptions, SqlServer, SqlServerError

__all__ = ["ServerOptions", "SqlServer", "SqlServerError"]
