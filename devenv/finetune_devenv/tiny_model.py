"""A tiny Llama and its tokenizer, built offline in a second: the model of `make demo` and every CPU
training test.

The tokenizer is a byte-level BPE trained here on a fixed corpus (no hub download), wrapped in
``PreTrainedTokenizerFast`` with a chat template whose assistant turns sit inside
``{% generation %}`` markers, so TRL can compute assistant-only loss. The model is a 2-layer
``LlamaConfig`` with hidden size 64, randomly initialised from a fixed seed: the same files on
every machine, so a run can be compared with another.

    path = build_tiny_model(tmp_path / "tiny")   # a folder for from_pretrained / the trainer
"""

from __future__ import annotations

from pathlib import Path

VOCAB_SIZE = 384
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eot|>", "<|system|>", "<|user|>", "<|assistant|>"]

# Assistant content and its end-of-turn token are inside the generation markers: the model learns
# to answer and to stop. The prompt rendered with add_generation_prompt is a prefix of the whole
# conversation, which TRL needs for prompt/completion and DPO data.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|eot|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|eot|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Please summarise the following text in one sentence.",
    "Kubernetes schedules pods onto nodes and restarts them when they fail.",
    "A checkpoint holds the adapter weights, the optimizer state and the random number generators.",
    "Translate to German: good morning. Guten Morgen.",
    "The answer is 42. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "Write a haiku about the sea. Waves fold into foam, the tide keeps its counsel, gulls argue.",
    "user assistant system hello thanks sure here is how you do it step by step.",
    "I prefer short, correct answers to long, wrong ones.",
]


def build_tokenizer(out_dir: Path) -> Path:
    """Train the byte-level BPE tokenizer and save it (tokenizer.json + config) into ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 20, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token="<|bos|>",
        eos_token="<|eot|>",
        pad_token="<|pad|>",
        model_max_length=512,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return out_dir


def build_tiny_model(out_dir: Path, *, seed: int = 0) -> Path:
    """Write tokenizer, config and fp32 safetensors weights of the tiny Llama into ``out_dir``.

    Idempotent: a folder that already holds a complete model is returned as it is.
    """
    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file():
        return out_dir
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    build_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    config = LlamaConfig(  # type: ignore[call-arg]  # torch_dtype: kept as the tests built it
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
        # Wider than Llama's 0.02: with a random frozen lm_head that small, no adapter can move the
        # logits far, and a few dozen steps of LoRA would barely lower the loss.
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    import sys

    print(build_tiny_model(Path(sys.argv[1])))
