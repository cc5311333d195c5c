"""The daemon: the service that wires the threads together, the watched folder, ingest and routing,
the workers that send, the finisher that moves files to done/ and failed/, and systemd/metrics."""
