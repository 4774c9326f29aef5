"""Ring 3, operations: worker processes, reuse-port and backlog listening, metrics and log formats."""
