"""A second model family, as a test fixture: proof that a family is one module plus one registry line.

Unlike ClipCap it puts no prefix before the text: the ST output, pooled, is added to every text
token's embedding through a zero-initialised gate (the way LLaMA-Adapter adds its visual tokens to
adaption prompts rather than to the input), so at initialisation the LM is exactly the plain LM.
The objectives, queue builder and trainer use it without knowing its name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eimctl.models.clip import ClipEncoder
from eimctl.models.lm import final_hidden, load_lm
from eimctl.models.protocol import LMOutput

SECTION = None
TRAINABLE_GROUPS = {"st": "st.", "gate": "gate", "lm": "lm.", "clip_prompts": "clip.prompts"}
CLIP_TUNING_GROUPS = ("clip_prompts",)
DEFAULT_STAGES = {
    "st": {"init": "pretrained", "trainable": ["st"], "losses": {"st": 1.0}},
    "lm": {"init": "st", "trainable": ["lm"], "losses": {"lm": 1.0}},
    "base-ie": {"init": "lm", "trainable": ["st", "gate", "clip_prompts"], "losses": {"base": 1.0, "ie": 1.0}},
}


class GatedSum(nn.Module):
    def __init__(self, config, prompt_tokens: int, prompts_active: bool):
        super().__init__()
        self.clip = ClipEncoder(config.model.clip, prompt_tokens, False, prompts_active)
        self.lm, self.tokenizer = load_lm(config.model.lm)
        self.lm_dim = self.lm.get_input_embeddings().embedding_dim
        self.st = nn.Linear(self.clip.feature_dim, self.lm_dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def compile_for_training(self) -> None:
        pass

    def encode_images(self, pixels):
        return self.clip.encode_images(pixels)

    def project(self, features):
        return self.st(features)

    def run_lm(self, visual, batch, *, logits=True):
        inputs = self.lm.get_input_embeddings()(batch["input_ids"])
        if visual is not None:
            inputs = inputs + torch.tanh(self.gate) * visual.mean(dim=1, keepdim=True)
        hidden = final_hidden(self.lm, inputs_embeds=inputs)
        return LMOutput(hidden=hidden, mask=batch["attention_mask"],
                        logits=self.lm.get_output_embeddings()(hidden) if logits else None)

    def response_loss(self, out, batch):
        losses = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                 batch["input_ids"][:, 1:].reshape(-1), reduction="none")
        mask = batch["loss_mask"][:, 1:].reshape(-1).float()
        return (losses * mask).sum() / mask.sum().clamp_min(1)

    def ie_query(self, features):
        return self.clip.ie_query(features)

    def embed_tokens(self, ids):
        return self.lm.get_input_embeddings()(ids)

    def text_hidden(self, ids, mask):
        return final_hidden(self.lm, input_ids=ids, attention_mask=mask)

    def generate(self, visual, prompts, *, max_new_tokens, beam_size):
        raise NotImplementedError("the skeleton family is not evaluated")


def build(config, *, groups, losses, active):
    prompts = config.eim.prompt_tokens if "clip_prompts" in groups else 0
    return GatedSum(config, prompts, "clip_prompts" in active)
