"""Train pdserve's demo model: a tiny Llama that writes docstring-style English.

Lifecycle: collect corpus -> train tokenizer -> pack sequences -> train -> save HF dir.

The corpus is text every machine with Python already has at run time: the
docstrings of the standard library (read with `ast`, nothing is imported) and
the language reference topics that ship in `pydoc_data`. Nothing is copied
into the repository; only the weights and tokenizer this script produces are.
A small instruction set is derived from the same docstrings ("What does
`json.dumps` do?" -> its first paragraph) so that the chat template leads to
an answer rather than to noise.

    python scripts/train_demo_model.py --out services/demo_model --steps 600

Seeded and single-process: the same torch version and step count give the
same weights.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import random
import sys
import sysconfig
import time
from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% else %}<|assistant|>\n{{ message['content'] }}</s>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__"}


def _docstrings(path: Path, module: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) for a module and its classes and functions."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return []
    found: list[tuple[str, str]] = []
    doc = ast.get_docstring(tree)
    if doc:
        found.append((module, doc))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            if doc and not node.name.startswith("_"):
                found.append((f"{module}.{node.name}", doc))
    return found


def collect_corpus(seed: int) -> list[str]:
    """Documents (plain text and chat-formatted) from the running Python."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pairs: list[tuple[str, str]] = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if SKIP_DIRS.intersection(rel.parts):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        pairs.extend(_docstrings(path, module))
    docs = [inspect.cleandoc(d) for _, d in pairs if len(d) >= 60]
    try:
        from pydoc_data.topics import topics  # the language reference, as text

        docs.extend(t.strip() for t in topics.values() if len(t) > 200)
    except ImportError:
        pass
    rng = random.Random(seed)
    chats = []
    for name, doc in pairs:
        answer = inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ").strip()
        if len(answer) >= 40:
            question = rng.choice(["What does `{}` do?", "Explain `{}`.", "Tell me about {}."]).format(name)
            chats.append(f"<|user|>\n{question}\n<|assistant|>\n{answer}</s>")
    texts = sorted(set(docs)) + sorted(set(chats))
    rng.shuffle(texts)
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def pack(tok, texts: list[str], seq_len: int):
    import torch

    eos = tok.token_to_id("</s>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def build_model(vocab_size: int, tok, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        torch_dtype="float32",
    )
    return LlamaForCausalLM(config)


def train(model, data, steps: int, batch: int, lr: float, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    start = time.time()
    for step in range(steps):
        rows = data[torch.randint(0, data.shape[0], (batch,), generator=gen)]
        # The model shifts labels by one position itself.
        out = model(input_ids=rows, labels=rows)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d} loss {out.loss.item():.3f} {time.time() - start:6.0f}s", flush=True)


def save(model, tok, out: Path, max_positions: int) -> None:
    from transformers import PreTrainedTokenizerFast

    import torch

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = False
    # Stored as bfloat16 (half the bytes in the repository), computed in float32:
    # CPUs without bf16 instructions run float32 faster, and vLLM upcasts on load.
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        model_max_length=max_positions,
        chat_template=CHAT_TEMPLATE,
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.save_pretrained(out)
    card = {"trained_by": "scripts/train_demo_model.py", "python": sys.version.split()[0]}
    (out / "pdserve_demo.json").write_text(json.dumps(card, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("services/demo_model"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-positions", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.manual_seed(args.seed)
    texts = collect_corpus(args.seed)
    print(f"corpus: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} M characters", flush=True)
    tok = train_tokenizer(texts, args.vocab_size)
    data = pack(tok, texts, args.seq_len)
    print(f"packed {data.shape[0]} sequences of {args.seq_len} tokens", flush=True)
    model = build_model(tok.get_vocab_size(), tok, args.max_positions)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M", flush=True)
    train(model, data, args.steps, args.batch, args.lr, args.seed)
    save(model, tok, args.out, args.max_positions)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
