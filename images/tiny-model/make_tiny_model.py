"""Make the sandbox's tiny Llama model: random weights, a BPE tokenizer, a chat template.

Runs inside the workload image (it has torch, transformers and tokenizers; the controller does
not need them), called by cluster/sandbox/model.py:

    docker run --rm --entrypoint python3 -v THIS_FILE:/opt/vcluster/make_tiny_model.py:ro \
        -v CACHE/models:/out vcluster/vllm-cpu:0.32.0 /opt/vcluster/make_tiny_model.py /out/DIR [SEED]

Deterministic: a fixed seed and fixed training sentences give the same files on every run.
Shape: hidden 256, 4 layers, 4 attention heads of 64 (vLLM's CPU attention rejects a head size
of 16), 2 KV heads (grouped-query attention, as in real Llama models).
"""

from __future__ import annotations

import sys
from pathlib import Path

SEED = 1234
HIDDEN_SIZE = 256
LAYERS = 4
ATTENTION_HEADS = 4
KV_HEADS = 2
INTERMEDIATE_SIZE = 512
MAX_POSITIONS = 512
VOCAB_SIZE = 512

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SENTENCES = [
    "vcluster turns GPU servers reachable over SSH into one vLLM endpoint.",
    "The sandbox runs the same code on a machine without GPUs.",
    "Each node runs its own sshd and its own Docker daemon.",
    "Ray forms one cluster from the nodes, and vLLM serves the model across them.",
    "Hello! How are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "Pipeline parallelism splits the layers of a model between nodes.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "<|system|> <|user|> <|assistant|>",
]


def train_tokenizer():
    """A byte-level BPE tokenizer trained on SENTENCES, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.model_max_length = MAX_POSITIONS
    return wrapped


def make_model(tokenizer, seed: int):
    """A randomly initialized Llama with the sandbox's shape, in bfloat16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=LAYERS,
        num_attention_heads=ATTENTION_HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HIDDEN_SIZE // ATTENTION_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16)


def main(out: Path, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    model = make_model(tokenizer, seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"tiny-llama: vocab {len(tokenizer)}, {model.num_parameters()} parameters, in {out}")


if __name__ == "__main__":
    # A second model is the same recipe with another seed: other weights, the same shape.
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else SEED)
