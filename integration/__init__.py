"""Real-broker tests and their provisioning: local broker processes, testcontainers, or an endpoint from the env."""
