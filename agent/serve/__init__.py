"""Serving: a loaded variant behind the OpenAI- and Ollama-compatible API, on this device only.

    runtime (onnxruntime-genai: load, generate) ─► engine (one scheduler thread, requests in turn)
        ─► serving (request → prompt → tokens → events) ─► api (FastAPI routes) · protocol (models)
    metrics: Prometheus counters and the inference window telemetry reads

Nothing here imports the fleet link (agent/fleet/).
"""
