"""The device side: runs a bundle variant with onnxruntime-genai and follows the fleet's desired state.

It imports only the inference runtime and the slmops core: never torch,
transformers, peft or Olive, so it installs from `pip install slmops[agent]`.
"""
