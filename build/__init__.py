"""The model pipeline: source models, export and quantization per target, evaluation, bundles.

One stage, one module, each readable top to bottom:

    models.py    a source checkpoint: the reference model from its GGUF, a local folder, a hub id
    export.py    one onnxruntime-genai variant per hardware target (model builder)
    evaluate.py  perplexity, decode speed, time to first token, peak RSS, size; gates
    bundle.py    a signed bundle from exported (and evaluated) variants

torch and transformers are imported inside the functions that need them, so the
CLI starts fast and `slmops bundle ...` works without them.
"""
