"""A tiny random-weight Llama model plus a locally trained tokenizer.

The demo and the tests need a real model directory that transformers and vLLM (CPU) can
load, without a model hub. Everything here is built from code in a few seconds: the weights
are random (outputs are noise), the tokenizer is a byte-level BPE trained on generated text.
Needs the ``cpu`` extra (torch, transformers, tokenizers come with vLLM).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

SEED = 1234
VOCAB_SIZE = 1000
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# Two lines of Jinja: each message as "<s>role: content</s>", then an open
# assistant turn when the caller asks for a generation prompt.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
# Written last; its presence means the directory is complete.
_MARKER = ".tiny_model_complete"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

_WORD_TEXT = """
the a an of to and in is it that for on with as was at by be this from or have not
are but had they his her which you were all we one there been can their has more if
will would who so no model token request replica engine ray serve trace span metric
callback node cluster deploy start stop ready latency error retry timeout download
load warm cold cache prompt reply chat hello world user assistant system quick brown
fox jumps over lazy dog
"""
_WORDS = _WORD_TEXT.split()


def _corpus(seed: int = SEED, lines: int = 3000) -> list[str]:
    """Deterministic pseudo-English lines plus digits/punctuation, so the BPE
    trainer has enough distinct pairs to reach the target vocabulary."""
    rng = random.Random(seed)
    out: list[str] = []
    for i in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        # Made-up words add character variety for the merges.
        letters = (rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
        words.append("".join(letters))
        line = " ".join(words).capitalize()
        out.append(f"{line}, {i} {rng.random():.3f}{rng.choice('.!?')}")
    return out


@contextlib.contextmanager
def _offline_env() -> Iterator[None]:
    """Force the HF libraries offline while building, restoring the env after."""
    keys = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def is_complete(dest: Path) -> bool:
    return (dest / _MARKER).is_file() and all((dest / f).is_file() for f in _REQUIRED)


def _build_tokenizer(out: Path) -> int:
    """Train the byte-level BPE, save it as a PreTrainedTokenizerFast; returns vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte encodes
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Llama-style: prepend BOS when add_special_tokens=True.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    # transformers 5 writes the template to chat_template.jinja; also keep it in
    # tokenizer_config.json for readers that only look there.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("chat_template", CHAT_TEMPLATE)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return int(tok.get_vocab_size())


def _build_model(out: Path, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    # No "Writing model shards" progress bar in the demo's output.
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,  # fits vLLM's CPU attention kernel
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    # fork_rng keeps the caller's global torch RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config).to(torch.float32)  # type: ignore[arg-type]
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)


def make_tiny_model(dest: Path) -> Path:
    """Create (or reuse) a tiny Llama model directory at ``dest`` and return it.

    Idempotent: a complete directory is returned untouched. The build happens in a
    sibling temp dir that is renamed into place, so a crash never leaves a half
    model behind and concurrent builders do not clash.
    """
    dest = Path(dest)
    if is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _offline_env():
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.build-", dir=dest.parent))
        try:
            vocab = _build_tokenizer(work)
            with (work / "tokenizer.json").open() as f:
                ids = {t["content"]: t["id"] for t in json.load(f)["added_tokens"]}
            _build_model(work, vocab, ids[BOS], ids[EOS], ids[PAD])
            (work / _MARKER).write_text("ok\n")
            work.chmod(0o755)  # mkdtemp makes it 0700
            if dest.exists():
                if is_complete(dest):  # another builder won the race
                    return dest
                shutil.rmtree(dest)  # incomplete leftover
            try:
                work.rename(dest)
            except OSError:
                if not is_complete(dest):
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return dest


if __name__ == "__main__":  # python -m llm_otel_callbacks.demo.tiny_model /some/dir
    import sys

    print(make_tiny_model(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-model")))
