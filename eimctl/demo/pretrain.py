"""Pretrain the demo's own small CLIP and language model on the generated data.

Real CLIP and GPT-2 weights cannot be downloaded here, so the embedded demo
makes stand-ins that have what the method relies on: a CLIP whose image and
text towers are aligned (contrastive pretraining on the demo captions) and an
LM that already knows the caption language (causal-LM pretraining).

    from eimctl.demo.pretrain import pretrain_demo_clip, pretrain_demo_lm
    clip_dir = pretrain_demo_clip(Path("runs/demo/data"), Path("runs/demo/models"))
    lm_dir = pretrain_demo_lm(Path("runs/demo/data"), Path("runs/demo/models"))

They load back through the ecosystem's own loaders:

    open_clip.create_model_and_transforms("local-dir:" + str(clip_dir))
    open_clip.get_tokenizer("local-dir:" + str(clip_dir))
    AutoModelForCausalLM.from_pretrained(lm_dir); AutoTokenizer.from_pretrained(lm_dir)

The work lives in `pretrain_clip` (CLIP), `pretrain_lm` (tokenizer and LM) and
`common` (what both share); this module gathers their public names.
"""
from __future__ import annotations

from eimctl.demo.pretrain_clip import (CLIP_MEAN, CLIP_STD, DEFAULT_CLIP_MODEL_CFG, clip_retrieval_accuracy,
                                       pretrain_demo_clip)
from eimctl.demo.pretrain_lm import (DEFAULT_LM_CFG, END_OF_TEXT, UNKNOWN, build_word_tokenizer, lm_perplexity,
                                     pretrain_demo_lm)

__all__ = ["CLIP_MEAN", "CLIP_STD", "DEFAULT_CLIP_MODEL_CFG", "DEFAULT_LM_CFG", "END_OF_TEXT", "UNKNOWN",
           "build_word_tokenizer", "clip_retrieval_accuracy", "lm_perplexity", "pretrain_demo_clip",
           "pretrain_demo_lm"]
