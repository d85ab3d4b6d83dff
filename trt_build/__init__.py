"""ONNX export, TensorRT engine build and the engine cache, as plain functions.

``export.export_component`` / ``export.get_or_export`` → ``build.get_or_build_engine`` (keyed and
stored by ``cache.EngineCache``). Nothing here imports tensorrt or onnxruntime at import time.
"""
