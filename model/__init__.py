"""The one Transformer of lmforge, its trainer, LoRA, evaluation and export. No Prefect, no storage.

Import submodules directly (``from model.gpt import GPT``): ``model.onnx_generate`` must
stay importable without torch.
"""
