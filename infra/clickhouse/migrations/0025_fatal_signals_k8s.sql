-- Workload identity of each fatal_signals row (issue 5). From the agent, resolved from cgroup_id:
-- container_id, pod_uid, container_runtime, cgroup_kind ('container', 'pod', 'host', or ''
-- when the cgroup was not found). From the ingester's Kubernetes watch: the k8s_* columns,
-- the selected labels and annotations, and enriched = 1 when the row's pod was found or it
-- belongs to no pod (host); 0 when the API was unreachable or the pod unknown.
-- ClickHouse cannot put new columns in front of an existing sorting key, and rebuilding
-- the table (copy + EXCHANGE) is neither idempotent nor safe while ingesters insert, so the
-- key stays and skip indexes serve filters on namespace and workload (README, Kubernetes).
ALTER TABLE fleet.fatal_signals
    ADD COLUMN IF NOT EXISTS `container_id` LowCardinality(String),
    ADD COLUMN IF NOT EXISTS `pod_uid` LowCardinality(String),
    ADD COLUMN IF NOT EXISTS `container_runtime` LowCardinality(String),
    ADD COLUMN IF NOT EXISTS `cgroup_kind` LowCardinality(String),
    ADD COLUMN IF NOT EXISTS `k8s_namespace` LowCardinality(String),
    ADD COLUMN IF NOT EXISTS `k8s_pod` LowCardinality(String),
    ADD COLUMN IF NOT EXISTS `k8s_container` LowCardinality(String),
    ADD COLUMN IF NOT EXISTS `k8s_workload_kind` LowCardinality(String),
    ADD COLUMN IF NOT EXISTS `k8s_workload` LowCardinality(String),
    ADD COLUMN IF NOT EXISTS `k8s_node` LowCardinality(String),
    ADD COLUMN IF NOT EXISTS `k8s_labels` Map(String, String) CODEC(ZSTD(1)),
    ADD COLUMN IF NOT EXISTS `k8s_annotations` Map(String, String) CODEC(ZSTD(1)),
    ADD COLUMN IF NOT EXISTS `enriched` UInt8,
    ADD INDEX IF NOT EXISTS `idx_k8s_namespace` `k8s_namespace` TYPE bloom_filter(0.01) GRANULARITY 1,
    ADD INDEX IF NOT EXISTS `idx_k8s_workload` `k8s_workload` TYPE bloom_filter(0.01) GRANULARITY 1
