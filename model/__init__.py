"""The one Transformer of lmforge, its trainer, LoRA, evaluation and export. No Prefect.

From ``storage`` it uses only :mod:`storage.atomic` (standard library: atomic directory
publishing), so checkpoints and artifacts are made safe the same one way.

Import submodules directly (``from model.gpt import GPT``): ``model.onnx_generate`` must
stay importable without torch.
"""
