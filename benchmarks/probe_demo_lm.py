#!/usr/bin/env python
"""Can the embedded demos' tiny LLaMA learn to look an answer up among lettered options, in a CPU budget?

    .venv/bin/python benchmarks/probe_demo_lm.py repeat               # control: induction on repeated text
    .venv/bin/python benchmarks/probe_demo_lm.py lookup --lr 1e-3 --batch-size 32 --steps 3000
    .venv/bin/python benchmarks/probe_demo_lm.py scienceqa --data demo/scienceqa/data --steps 3000

Not part of `make bench`: a measurement behind the ScienceQA and chat demos' learning gates. Every probe
trains the demo's LLaMA shape (eimctl.demo.pretrain_llama.DEFAULT_LLAMA_CFG, 0.7M parameters) from random
weights with the demo pretraining's own tokenizer builder, AdamW grouping and warm-up cosine schedule, and
prints a held-out figure every --eval-every steps:

- repeat: 12 random words, "|", the same 12 words; the loss on the second half (falls from ~3.2 to ~0 once
  the model copies from its context: the control that in-context copying can form at all);
- lookup: "Options: (A) frog (B) green ...\\nSo green is B. frog is A." (every option asked once, in random
  order); the accuracy of the letter after held-out "Options: ...\\nSo <word> is" (chance 32%: the mean of
  1/n over n = 2..5 options);
- scienceqa: `eimctl demo-pretrain --kind scienceqa`'s documents (each train problem's text, QCM-ALE
  formatted problems of a separate pool) plus --drills lookup documents over the set's values; per context
  type, the accuracy of the letter the LM scores highest after each val problem's QCM-ALE prompt
  ("... Response:The answer is X.").
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eimctl.demo import pretrain_llama as demo_llama  # noqa: E402
from eimctl.demo.common import adamw, warmup_cosine  # noqa: E402

WORDS = ("red blue green yellow white black circle square triangle cross star one two three four five wood glass "
         "metal paper stone rubber cat dog fish bird frog horse hot cold big small fast slow").split()
LETTERS = "ABCDE"


def options(rng: random.Random, words) -> tuple[list[str], str]:
    chosen = rng.sample(list(words), rng.randint(2, 5))
    return chosen, " ".join(f"({LETTERS[i]}) {word}" for i, word in enumerate(chosen))


def lookup_document(rng: random.Random, words) -> str:
    chosen, text = options(rng, words)
    asked = rng.sample(range(len(chosen)), len(chosen))
    return f"Options: {text}\nSo " + " ".join(f"{chosen[i]} is {LETTERS[i]}." for i in asked)


def repeat_document(rng: random.Random) -> str:
    words = " ".join(rng.choice(WORDS) for _ in range(12))
    return f"{words} | {words}"


def scienceqa_prompt(problem: dict) -> tuple[str, int, int]:
    from eimctl.tasks.scienceqa_prompts import format_problem
    sample = SimpleNamespace(caption="", **{k: problem[k] for k in ("question", "hint", "choices", "answer",
                                                                    "lecture", "solution")})
    instruction, _ = format_problem(sample, "QCM-ALE", "lavin")
    return instruction + "The answer is", problem["answer"], len(problem["choices"])


def scienceqa_documents(data: Path, drills: int, rng: random.Random) -> tuple[list[str], list[tuple]]:
    """The demo pretraining's documents plus `drills` lookup documents; held out: (prompt, answer, n, kind)."""
    train = demo_llama.read_split(data, "train")
    pool_seed = demo_llama.FORMAT_POOL_SEED + demo_llama.scienceqa_data_parameters(data)["seed"]
    texts = demo_llama.documents_of(train, "problem") + demo_llama.format_documents(data, len(train), pool_seed)
    values = sorted({choice for p in train for choice in p["choices"]})
    texts += [lookup_document(rng, values) for _ in range(drills)]
    kind = lambda p: "IMG" if p["image"] else ("TXT" if p["hint"] else "NO")  # noqa: E731
    held_out = [(*scienceqa_prompt(p), kind(p)) for p in demo_llama.read_split(data, "val")]
    return texts, held_out


def documents(args, rng: random.Random) -> tuple[list[str], list[tuple]]:
    if args.probe == "repeat":
        return [repeat_document(rng) for _ in range(args.documents)], [repeat_document(rng) for _ in range(64)]
    if args.probe == "lookup":
        texts = [lookup_document(rng, WORDS) for _ in range(args.documents)]
        held_out = []
        for _ in range(300):
            chosen, text = options(rng, WORDS)
            answer = rng.randrange(len(chosen))
            held_out.append((f"Options: {text}\nSo {chosen[answer]} is", answer, len(chosen), "lookup"))
        return texts, held_out
    return scienceqa_documents(args.data, args.drills, rng)


@torch.no_grad()
def letter_accuracy(model, tokenizer, held_out: list[tuple]) -> dict[str, float]:
    """Per kind, how often the highest-scoring allowed letter (" A" ... " E") after the prompt is the answer."""
    letter_ids = [tokenizer.convert_tokens_to_ids("Ġ" + letter) for letter in LETTERS]
    hits: dict[str, list[int]] = {}
    for prompt, answer, n_choices, kind in held_out:
        ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1, letter_ids[:n_choices]]
        hits.setdefault(kind, []).append(int(int(logits.argmax()) == answer))
    return {kind: round(100.0 * sum(h) / len(h), 1) for kind, h in hits.items()}


@torch.no_grad()
def second_half_loss(model, tokenizer, held_out: list[str], ids: dict) -> float:
    token_ids = demo_llama.encode_documents(tokenizer, held_out, 512)
    input_ids, attention_mask, labels = demo_llama.frame_batch(token_ids, ids)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    half = input_ids.size(1) // 2 + 2   # past the "|": every token from here is a copy
    return float(torch.nn.functional.cross_entropy(logits[:, half:-1].flatten(0, 1), labels[:, half + 1:].flatten()))


def evaluate(args, model, tokenizer, held_out, ids) -> str:
    model.eval()
    try:
        if args.probe == "repeat":
            return f"held-out second-half loss {second_half_loss(model, tokenizer, held_out, ids):.3f}"
        return f"held-out letter accuracy {letter_accuracy(model, tokenizer, held_out)}"
    finally:
        model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("probe", choices=("repeat", "lookup", "scienceqa"))
    parser.add_argument("--data", type=Path, default=Path("demo/scienceqa/data"), help="scienceqa: the demo set")
    parser.add_argument("--documents", type=int, default=20000, help="repeat / lookup: training documents")
    parser.add_argument("--drills", type=int, default=30000, help="scienceqa: lookup documents added")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    texts, held_out = documents(args, rng)
    train(args, texts, held_out)


def train(args, texts: list[str], held_out: list) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = demo_llama.build_bpe_tokenizer(texts, 1024, 512)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                                         pad_token_id=ids["pad"], **demo_llama.DEFAULT_LLAMA_CFG))
    token_ids = demo_llama.encode_documents(tokenizer, texts, 512)
    optimizer = adamw(model, args.lr, 0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, args.steps, args.steps // 10))
    order_generator, step, started = torch.Generator().manual_seed(args.seed), 0, time.monotonic()
    print(f"{args.probe}: {len(texts)} documents, {args.steps} steps of {args.batch_size}, lr {args.lr}", flush=True)
    while step < args.steps:
        order = torch.randperm(len(token_ids), generator=order_generator).tolist()
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
            input_ids, attention_mask, labels = demo_llama.frame_batch(
                [token_ids[i] for i in order[start:start + args.batch_size]], ids)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step % args.eval_every == 0 or step == args.steps:
                print(f"step {step} train loss {loss.item():.3f} {time.monotonic() - started:.0f}s "
                      f"{evaluate(args, model, tokenizer, held_out, ids)}", flush=True)
            if step == args.steps:
                return


if __name__ == "__main__":
    main()
