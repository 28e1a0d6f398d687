# fleetscope agent and ingester image. The CO-RE probes are compiled at build time against
# the build host's BTF (/sys/kernel/btf/vmlinux) and relocate to the running kernel at load;
# on a node without BTF the agent compiles bpf/<probe>.bcc.c with bcc (python3-bpfcc) instead.
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends \
        clang llvm libbpf-dev libbpf1 bpftool libelf-dev make python3-bpfcc \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/fleetscope
COPY . .
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir -e '.[dev]' \
    && /opt/venv/bin/python -m grpc_tools.protoc -I schemas --python_out=. schemas/fleetscope/v1/*.proto \
    && touch fleetscope/v1/__init__.py \
    && make -s -C bpf
ENV PATH=/opt/venv/bin:$PATH
ENTRYPOINT []
CMD ["fleetscope", "--help"]
