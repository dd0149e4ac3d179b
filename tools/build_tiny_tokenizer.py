"""Rebuild the tiny model's tokenizer (lm_gym/data/tiny_tokenizer) from the default prompt set.

A byte-level BPE with 1,000 tokens and a ChatML chat template; any text encodes (bytes never go
unknown). Run from the project root: ``python tools/build_tiny_tokenizer.py``.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lm_gym.data import default_prompts

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
OUT = Path(__file__).resolve().parents[1] / "lm_gym" / "data" / "tiny_tokenizer"


def main() -> None:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    core.train_from_iterator(default_prompts(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|endoftext|>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(OUT)
    print(f"wrote {len(tokenizer)} tokens to {OUT}")


if __name__ == "__main__":
    main()
