"""The fleet service: REST API, registry, fleet, MQTT bridge, chunk serving, embedded broker, storage."""
