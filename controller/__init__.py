"""The fleet service: REST API, registry, rollout engine, MQTT bridge, storage (issue 4)."""
