-- What the oom_kills and fatal_signals probes saw of each exited process, joined on the node:
-- the process probe's exit program reads their maps (bpf/exit_join.bpf.h), so the exit row
-- itself carries them (ingester/spans.py turns them into the process span's events).
-- Zeros when those probes do not run on the node, or with the bcc loader.
--   oom_killed = 1: the OOM killer chose the process; oom_delay_ns from that kill to the
--   exit; the memory figures at the kill (KiB) as in fleet.oom_kills, oom_score_adj, and
--   oom_trigger_pid, the task whose allocation ran out.
--   signal_sender_known = 1: the terminating signal's generation was seen (SIGKILL, SIGSEGV,
--   SIGBUS, SIGABRT): signal_code (si_code), the sender's pid, uid and comm, and
--   signal_delay_ns from the generation to the exit, as in fleet.fatal_signals.
ALTER TABLE fleet.process_exit
    ADD COLUMN IF NOT EXISTS `oom_killed` UInt8,
    ADD COLUMN IF NOT EXISTS `oom_delay_ns` UInt64 CODEC(T64, ZSTD(1)),
    ADD COLUMN IF NOT EXISTS `oom_total_vm_kb` UInt64 CODEC(T64, ZSTD(1)),
    ADD COLUMN IF NOT EXISTS `oom_anon_rss_kb` UInt64 CODEC(T64, ZSTD(1)),
    ADD COLUMN IF NOT EXISTS `oom_file_rss_kb` UInt64 CODEC(T64, ZSTD(1)),
    ADD COLUMN IF NOT EXISTS `oom_shmem_rss_kb` UInt64 CODEC(T64, ZSTD(1)),
    ADD COLUMN IF NOT EXISTS `oom_pgtables_kb` UInt64 CODEC(T64, ZSTD(1)),
    ADD COLUMN IF NOT EXISTS `oom_score_adj` Int16,
    ADD COLUMN IF NOT EXISTS `oom_trigger_pid` UInt32 CODEC(T64, ZSTD(1)),
    ADD COLUMN IF NOT EXISTS `signal_sender_known` UInt8,
    ADD COLUMN IF NOT EXISTS `signal_code` Int32,
    ADD COLUMN IF NOT EXISTS `signal_sender_pid` UInt32 CODEC(T64, ZSTD(1)),
    ADD COLUMN IF NOT EXISTS `signal_sender_uid` UInt32 CODEC(T64, ZSTD(1)),
    ADD COLUMN IF NOT EXISTS `signal_sender_comm` LowCardinality(String),
    ADD COLUMN IF NOT EXISTS `signal_delay_ns` UInt64 CODEC(T64, ZSTD(1))
