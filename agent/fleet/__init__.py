"""The fleet link: the device's side of the controller's MQTT protocol.

    uplink (one paho client: presence, birth, telemetry, what names this device)
        ─► sync (desired states and commands, one at a time) ─► slots (A/B: active.json)
        ─► transfer (bundle files as chunks over MQTT, checked against the manifest)

It drives the served model through agent/host.py; agent/serve/ never imports it.
"""
