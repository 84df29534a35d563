"""The model pipeline: source models, export and quantization per target, evaluation, bundles.

One stage, one module, each readable top to bottom (docs/ARCHITECTURE.md lists them all), e.g.:

    models.py    a source checkpoint: the reference model from its GGUF, a local folder, a hub id
    export.py    one variant per hardware target (the model builder, OpenVINO IR, QNN), gated on accuracy
    adapters.py  LoRA adapters a variant carries beside its base graph
    evaluate.py  perplexity, decode speed, time to first token, peak RSS, size; gates
    bundle.py    a signed bundle from exported (and evaluated) variants
    finetune.py, teacher.py, student.py, distill.py   fine-tuning and distillation
    pipeline.py  recipes: every stage in order, cached; executors.py: here or on a Ray cluster

torch and transformers are imported inside the functions that need them, so the
CLI starts fast and `slmops bundle ...` works without them.
"""
