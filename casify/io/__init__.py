"""What leaves the process: a saved model's folder (``config.json`` + ``model.safetensors`` + checksum, written
atomically), its model card and evaluation summary, the Hugging Face Hub upload with its access check and publishing
guard, pushing a saved folder, output folders, the run table and console progress. It may import :mod:`casify.core`
and below (:mod:`casify.defenses`, :mod:`casify.models`, :mod:`casify.version`), never a model class: the wrapped model
calls into it to save itself, and loading a folder back, which rebuilds a model, lives in :mod:`casify.model.defended`.
"""
