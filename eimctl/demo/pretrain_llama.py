"""The ScienceQA demo's own tiny LLaMA: a byte-level BPE tokenizer and causal-LM pretraining on the train text.

    llama_dir = pretrain_demo_llama(Path("runs/sqa-demo/data"), Path("runs/sqa-demo/models"))
    AutoModelForCausalLM.from_pretrained(llama_dir); AutoTokenizer.from_pretrained(llama_dir)

The chat demo (eimctl/data/chat_demo.py) uses the same machinery with `documents="chat"`: every distinct
instruction and response of its training files as its own plain document (so no question sits next
to its answer), and LaVIN's "Instruction: ... Response:" markers for the tokenizer only.

What it reads (ScienceQA): the train split's problems (generate_scienceqa_demo). With the default
`documents="problem"` each problem is one plain document — question, hint, the choices joined
by ", " and solution, one per line — plus each distinct lecture once (a lecture is the same for
every problem of a kind); never the formatted prompt or the "The answer is X. BECAUSE: ..."
target. The LM thus knows the demo's language and, like a real pretrained LM, has read answers
stated in words (the solutions end "so the answer is blue"); what it has never seen is the task:
the "Question: ... Response:" format, answering with an option letter, and anything about the
pictures. Those are left to the stages. `documents="fields"` is stricter: every field is a
separate (deduplicated) document, so the LM never sees a question next to its solution.

`documents="problem+format"` (what `eimctl demo-pretrain --kind scienceqa` uses) adds as many
formatted documents as the train split has problems: the LaVIN template's QCM-ALE prompt and
target, "Question: ... Response:The answer is B. BECAUSE: ...", of problems drawn from another
seed (none equal to a val or test problem; nothing rendered). A real LLaMA has read text in
question-and-answer formats before it meets ScienceQA; this gives the tiny LM that much. With
the plain documents alone no stage of either family learnt to answer with a letter in the demo's
budget (every answer of every stage failed the parse). The set's own problems are never shown
formatted, and the pictures are never shown at all: an image question's letter cannot be read
from its text, which is what the stages' visual paths are for.

The defaults (8 epochs of batches of 16 documents, peak learning rate 5e-3) take about two
minutes on two CPU cores and are deterministic (no time cap unless `max_seconds` is given);
they are where the LM starts to copy a stated answer in context (a value from the hint or the
solution), which fewer steps do not reach.

The tokenizer is trained on the same text plus the prompt format's markers ("Question:",
"Context:", "Options: (A) ...", "Response:", "The answer is A. BECAUSE:", "Image: ", "N/A"),
so they are few tokens; being byte-level it round-trips any text exactly ("\\n" included).
It is saved as a `PreTrainedTokenizerFast` with <s> (bos), </s> (eos), <pad> and <unk>
(id 0, as LLaMA's), and adds no special tokens by itself: a family's code places BOS and EOS.
"""
from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from eimctl.data.scienceqa_demo import SUMMARY
from eimctl.demo.common import Log, StepTrainer, pretrain_once, train_causal_lm, write_marker
from eimctl.runtime.errors import EimError

DEFAULT_LLAMA_CFG = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "intermediate_size": 256, "max_position_embeddings": 512,
                     "tie_word_embeddings": True}
UNKNOWN, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
LETTERS = "ABCDE"
FORMAT_POOL_SEED = 1000  # added to the set's seed: the formatted pool is drawn apart from the set's problems


def scienceqa_data_parameters(data_dir: Path) -> dict:
    """The generator's parameters, which identify the set: a changed set invalidates a cached model."""
    marker = Path(data_dir) / SUMMARY
    if not marker.is_file():
        raise EimError(f"no demo set in {data_dir} (missing {SUMMARY})",
                       hint="generate it first: eimctl demo-data --kind scienceqa (or chat) --out DIR")
    return json.loads(marker.read_text(encoding="utf-8"))["parameters"]


def chat_texts(data_dir: Path) -> tuple[list[str], list[str]]:
    """(documents, format lines) of the chat demo (eimctl/data/chat_demo.py): every instruction and response of
    its training files as plain text, and LaVIN's instruction markers for the tokenizer only."""
    texts, markers = [], ["Instruction: ", "\nResponse:", "Image: ", "Image: N/A"]
    for name in ("alpaca_data.json", "detail_23k.json", "conversation_58k.json"):
        path = Path(data_dir) / "train" / name
        rows = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
        for row in rows:
            if "conversations" in row:
                texts += [turn["value"].replace("<image>", "").strip() for turn in row["conversations"]]
            else:
                texts += [part for part in (row["instruction"], row["input"], row["output"]) if part]
    return sorted(set(texts)), markers


def read_split(data_dir: Path, split: str) -> list[dict]:
    """The problems of one split (as pid_splits.json lists them), each with its "qid"."""
    problems = json.loads((Path(data_dir) / "problems.json").read_text(encoding="utf-8"))
    qids = json.loads((Path(data_dir) / "pid_splits.json").read_text(encoding="utf-8"))[split]
    return [{"qid": qid, **problems[qid]} for qid in qids]


def documents_of(problems: list[dict], documents: str = "problem") -> list[str]:
    """The pretraining text: one plain document per problem, or ("fields") each field on its own, deduplicated
    and sorted. Never the formatted prompt or the "The answer is X" target ("problem+format" adds those of a
    separate pool: `format_documents`)."""
    if documents in ("problem", "problem+format"):
        # A lecture is the same for every problem of a kind: once each, not once per problem.
        return ["\n".join(part for part in (p["question"], p["hint"], ", ".join(p["choices"]), p["solution"]) if part)
                for p in problems] + sorted({p["lecture"] for p in problems if p["lecture"]})
    if documents == "fields":
        fields = {text for p in problems for text in (p["question"], p["hint"], ", ".join(p["choices"]),
                                                      p["lecture"], p["solution"]) if text}
        return sorted(fields)
    raise EimError(f"unknown pretraining documents {documents!r}", hint='use "problem", "problem+format" or "fields"')


def format_documents(data_dir: Path, n: int, seed: int) -> list[str]:
    """`n` problems of a pool drawn apart from the set (another seed; no val or test problem's key), each as the
    LaVIN template's QCM-ALE training text: the prompt ending "Response:" and "The answer is X. BECAUSE: ..."."""
    from eimctl.data.scienceqa_demo import draw_text_problems, problem_key

    forbidden = {problem_key(p) for split in ("val", "test") for p in read_split(data_dir, split)}
    return [lines[0] + lines[3] for lines in map(_format_lines, draw_text_problems(n, seed, forbidden))]


def _format_lines(problem: dict) -> list[str]:
    """The prompt format's markers around this problem's text (for the tokenizer only)."""
    options = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(problem["choices"]))
    prompt = f"Question: {problem['question']}\nContext: {problem['hint'] or 'N/A'}\nOptions: {options}\n"
    letter = LETTERS[problem["answer"]]
    return [prompt + "Response:", prompt + "Answer:", "Image: N/A" if problem["image"] is None else "Image: ",
            f"The answer is {letter}. BECAUSE: {problem['lecture']} {problem['solution']}".replace("\n", "\\n")]


def build_bpe_tokenizer(texts: list[str], vocab_size: int, model_max_length: int):
    """A byte-level BPE over `texts`, as a transformers fast tokenizer (exact round trip, no added specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNKNOWN, BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNKNOWN, model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False)


def pretrain_demo_llama(data_dir: Path, out_dir: Path, *, seed: int = 0, epochs: int = 8, batch_size: int = 16,
                        learning_rate: float = 5e-3, weight_decay: float = 0.0, vocab_size: int = 1024,
                        documents: str = "problem", model_cfg: dict | None = None, max_seconds: float | None = None,
                        log: Log = print, log_every: int = 50) -> Path:
    """Pretrain a tiny LlamaForCausalLM on the train split's text; return `out_dir / "llama"` (a Hugging Face
    folder with the model and its tokenizer). Skipped when a finished build with the same parameters is there.

    `weight_decay` defaults to 0: the shared AdamW grouping spares parameters named like GPT-2's embeddings,
    and LLaMA's `embed_tokens` (tied to the output head) is not named so."""
    data_dir, target = Path(data_dir), Path(out_dir) / "llama"
    if documents != "chat":
        documents_of([], documents)  # refuse an unknown kind before any work
    parameters = {"seed": seed, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                  "weight_decay": weight_decay, "vocab_size": vocab_size, "documents": documents,
                  "model_cfg": {**DEFAULT_LLAMA_CFG, **(model_cfg or {})}, "max_seconds": max_seconds,
                  "data": scienceqa_data_parameters(data_dir)}
    build = partial(_build_llama, data_dir=data_dir, parameters=parameters, log=log, log_every=log_every)
    return pretrain_once("llama", target, parameters, build, log)


def _build_llama(staging: Path, *, data_dir: Path, parameters: dict, log: Log, log_every: int) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    started = time.monotonic()
    torch.manual_seed(parameters["seed"])
    if parameters["documents"] == "chat":
        texts, markers = chat_texts(data_dir)
        val_texts = []
    else:
        train = read_split(data_dir, "train")
        texts, markers = documents_of(train, parameters["documents"]), [line for p in train for line in _format_lines(p)]
        if parameters["documents"] == "problem+format":
            texts += format_documents(data_dir, len(train), FORMAT_POOL_SEED + parameters["data"]["seed"])
        val_texts = documents_of(read_split(data_dir, "val"), parameters["documents"])
    model_cfg = parameters["model_cfg"]
    tokenizer = build_bpe_tokenizer(texts + markers, parameters["vocab_size"], model_cfg["max_position_embeddings"])
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                         pad_token_id=ids["pad"], **model_cfg)
    model = LlamaForCausalLM(config)
    n_parameters = sum(p.numel() for p in model.parameters())
    log(f"llama: {len(texts)} documents, vocabulary {len(tokenizer)}, {n_parameters / 1e6:.2f}M parameters")
    token_ids = encode_documents(tokenizer, texts, model_cfg["max_position_embeddings"])
    trainer = _train(model, token_ids, ids, parameters, staging, log, log_every)

    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    train_seconds = time.monotonic() - started
    # Measured on the saved copy, which also proves that the folder loads back.
    reloaded = AutoModelForCausalLM.from_pretrained(staging)
    perplexity = {split: round(llama_perplexity(reloaded, tokenizer, split_texts), 4) if split_texts else None
                  for split, split_texts in (("train", texts), ("val", val_texts))}
    log(f"llama: final batch loss {trainer.last_loss:.4f}, perplexity train {perplexity['train']} "
        f"val {perplexity['val']}, {trainer.step} steps in {train_seconds:.0f}s")
    write_marker(staging, parameters, {"train_perplexity": perplexity["train"], "val_perplexity": perplexity["val"],
                                       "vocab_size": len(tokenizer), "parameters": n_parameters,
                                       "documents": len(texts), **trainer.summary(train_seconds)})


def encode_documents(tokenizer, texts: list[str], max_positions: int) -> list[list[int]]:
    """Token ids per document, cut so that <s> ids </s> fits the model's positions."""
    return [ids[:max_positions - 2] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def frame_batch(token_ids: list[list[int]], ids: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each document framed as <s> document </s>, padded with <pad>; labels ignore the padding."""
    framed = [[ids["bos"]] + seq + [ids["eos"]] for seq in token_ids]
    length = max(len(seq) for seq in framed)
    input_ids = torch.full((len(framed), length), ids["pad"])
    attention_mask = torch.zeros((len(framed), length), dtype=torch.long)
    for row, seq in enumerate(framed):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        attention_mask[row, :len(seq)] = 1
    return input_ids, attention_mask, input_ids.masked_fill(attention_mask == 0, -100)


def _train(model, token_ids: list[list[int]], ids: dict, parameters: dict, staging: Path, log: Log,
           log_every: int) -> StepTrainer:
    return train_causal_lm("llama", model, token_ids, partial(frame_batch, ids=ids), parameters, staging, log,
                           log_every)


@torch.no_grad()
def llama_perplexity(model, tokenizer, texts: list[str], batch_size: int = 64) -> float:
    """Per-token perplexity of `texts`, each framed as <s> text </s>."""
    model.eval()
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    token_ids = encode_documents(tokenizer, texts, model.config.max_position_embeddings)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(token_ids), batch_size):
        input_ids, attention_mask, labels = frame_batch(token_ids[start:start + batch_size], ids)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        shifted = labels[:, 1:]
        total_nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), shifted.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
        total_tokens += int((shifted != -100).sum())
    return math.exp(total_nll / total_tokens)
