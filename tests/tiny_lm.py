"""Tiny model folders for the example-script tests: random weights, and a small BPE tokenizer trained in a second on
the real rows the test uses (no download). Import with ``from tiny_lm import ...`` (tests/ is on the path)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SHARED_DATA = Path(os.environ.get("APT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "</s>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]


def bpe_tokenizer(texts: Iterable[str], vocab_size: int = 400, chat_template: bool = True
                  ) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``: pad 0, eos 1 (``</s>``, or ``<|im_end|>`` with the ChatML
    chat template), unk 2, bos 3."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<s>",
                                                eos_token="<|im_end|>" if chat_template else "</s>")
    if chat_template:
        fast.chat_template = CHATML
    return fast


def tiny_llama_dir(path: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """A random tiny LLaMA (grouped-query attention) saved with ``tokenizer`` as a model folder."""
    fields = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=512,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    fields.update(overrides)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_t5_dir(path: Path, tokenizer, seed: int = 0) -> Path:
    """A random tiny T5 (gated-GELU FFN, as t5-lm-adapt) saved with ``tokenizer``."""
    config = transformers.T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                   num_decoder_layers=2, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=32,
                                   decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    transformers.T5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_bert_qa_dir(path: Path, tokenizer, seed: int = 0) -> Path:
    """A random tiny BERT for extractive QA saved with ``tokenizer`` (a real BERT tokenizer: offsets, pairs)."""
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(seed)
    transformers.BertForQuestionAnswering(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
