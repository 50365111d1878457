"""Shared tiny-model fixtures for the apt_hf tests.

Every model here is randomly initialised from a tiny config (hidden 32-64, 3 layers), so no download is needed and
a forward pass takes milliseconds. The plain functions can also be imported (``from conftest import make_model``);
the fixtures of the same names hand them to tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from typing import Optional  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

VOCAB = 101
SEQ_LEN = 7
N_LABELS = 3

# kind -> (model class name, PEFT task type)
KINDS: dict[str, tuple[str, str]] = {
    "bert": ("BertForSequenceClassification", "SEQ_CLS"),
    "roberta": ("RobertaForSequenceClassification", "SEQ_CLS"),
    "llama_mha": ("LlamaForCausalLM", "CAUSAL_LM"),
    "llama_gqa": ("LlamaForCausalLM", "CAUSAL_LM"),
    "llama_cls": ("LlamaForSequenceClassification", "SEQ_CLS"),
    "xlmr": ("XLMRobertaForSequenceClassification", "SEQ_CLS"),
    "qwen3": ("Qwen3ForCausalLM", "CAUSAL_LM"),
    "gemma2": ("Gemma2ForCausalLM", "CAUSAL_LM"),
    "gemma3": ("Gemma3ForCausalLM", "CAUSAL_LM"),
    "distilbert": ("DistilBertForSequenceClassification", "SEQ_CLS"),
    "vit": ("ViTForImageClassification", "SEQ_CLS"),
    "phi3": ("Phi3ForCausalLM", "CAUSAL_LM"),
    "modernbert": ("ModernBertForSequenceClassification", "SEQ_CLS"),
    "deberta_v2": ("DebertaV2ForSequenceClassification", "SEQ_CLS"),
    "deberta_v3": ("DebertaV2ForSequenceClassification", "SEQ_CLS"),
}
# The architectures every exactness test must cover (one tiny model per registered model_type family variant).
EXACT_KINDS = ("bert", "roberta", "llama_mha", "llama_gqa", "xlmr", "qwen3", "gemma2", "gemma3", "distilbert", "vit",
               "phi3", "modernbert", "deberta_v2", "deberta_v3")
# Decoder kinds whose generation must be exact too.
DECODER_KINDS = ("llama_mha", "llama_gqa", "qwen3", "gemma2", "gemma3", "phi3")
# transformers has no sdpa path for these (Gemma 2: attention soft-capping; DeBERTa-v2: relative-position terms)
EAGER_ONLY = ("gemma2", "deberta_v2", "deberta_v3")
IMAGE_KINDS = ("vit",)  # models that read pixel_values


def kinds_and_attentions(kinds: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(kind, attn)`` pairs: eager for every kind, sdpa too where the family has it."""
    return [(k, a) for k in kinds for a in ("eager", "sdpa") if a == "eager" or k not in EAGER_ONLY]


class TokenTask(torch.utils.data.Dataset):
    """Sequence classification on random tokens: label 1 iff the first token id is above 50 (learnable from one
    position)."""

    def __init__(self, n: int = 256, seq_len: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 101, (n, seq_len), generator=g)
        self.labels = (self.ids[:, 0] > 50).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class ImageTask(torch.utils.data.Dataset):
    """Image classification on random 3 x 8 x 8 images: label 1 iff the mean of the first patch's first channel is
    positive (learnable from one patch)."""

    def __init__(self, n: int = 256, size: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(n, 3, size, size, generator=g)
        self.labels = (self.pixels[:, 0, :4, :4].mean((1, 2)) > 0).long()

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def make_config(kind: str, attn: str = "eager", **overrides) -> transformers.PretrainedConfig:
    """A tiny config of ``kind`` (see :data:`KINDS`); ``overrides`` replace any field."""
    if kind in ("bert", "roberta", "xlmr"):
        cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
               "xlmr": transformers.XLMRobertaConfig}[kind]
        fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=48, max_position_embeddings=40, num_labels=N_LABELS,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        if kind != "bert":
            fields.update(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    elif kind in ("llama_mha", "llama_gqa", "llama_cls", "qwen3"):
        cls = transformers.Qwen3Config if kind == "qwen3" else transformers.LlamaConfig
        fields = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=2 if kind in ("llama_gqa", "qwen3") else 8, intermediate_size=80,
                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      num_labels=N_LABELS, tie_word_embeddings=False)
        if kind == "qwen3":  # per-head q_norm / k_norm over head_dim (shared by all heads)
            fields.update(head_dim=8)
    elif kind in ("gemma2", "gemma3"):
        # tied embeddings, soft-capping, sliding-window layers (window 4 < SEQ_LEN), four (1 + w) norms per layer;
        # gemma3: per-head q_norm / k_norm too
        cls = transformers.Gemma2Config if kind == "gemma2" else transformers.Gemma3TextConfig
        fields = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=8, intermediate_size=80, max_position_embeddings=64,
                      query_pre_attn_scalar=8, sliding_window=4, attn_logit_softcapping=50.0,
                      final_logit_softcapping=30.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=True,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    elif kind == "distilbert":
        cls = transformers.DistilBertConfig
        fields = dict(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, hidden_dim=48, max_position_embeddings=40,
                      num_labels=N_LABELS, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
    elif kind == "phi3":  # fused qkv_proj and gate_up_proj, grouped-query attention
        cls = transformers.Phi3Config
        fields = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=80, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, num_labels=N_LABELS, tie_word_embeddings=False,
                      resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    elif kind == "modernbert":  # fused Wqkv and GLU Wi (with biases here), local attention (window 4 < SEQ_LEN)
        cls = transformers.ModernBertConfig
        fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=48, max_position_embeddings=40, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, cls_token_id=1, sep_token_id=2, num_labels=N_LABELS, local_attention=4,
                      global_attn_every_n_layers=2, attention_bias=True, mlp_bias=True, norm_bias=True,
                      embedding_dropout=0.0, attention_dropout=0.0, mlp_dropout=0.0, classifier_dropout=0.0)
    elif kind == "vit":  # 8 x 8 images in 4 x 4 patches: a CLS token and 4 patch tokens
        cls = transformers.ViTConfig
        fields = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, image_size=8,
                      patch_size=4, num_channels=3, num_labels=N_LABELS, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    elif kind in ("deberta_v2", "deberta_v3"):
        # v2: own position projections (pos_key_proj / pos_query_proj), un-normalised relative embeddings, absolute
        # positions and token types; v3: key/query projections shared with the positions, log-bucketed relative
        # positions (4 buckets < SEQ_LEN), LayerNorm on the relative embeddings. Weights of std 0.2 (not 0.02), so
        # that the relative-position terms move the logits well beyond the tolerance of the exactness tests.
        cls = transformers.DebertaV2Config
        fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=48, max_position_embeddings=40, num_labels=N_LABELS, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, relative_attention=True, pos_att_type=["p2c", "c2p"],
                      initializer_range=0.2)
        if kind == "deberta_v2":
            fields.update(share_att_key=False, norm_rel_ebd="none", position_biased_input=True, type_vocab_size=2,
                          max_relative_positions=16)
        else:
            fields.update(share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
                          type_vocab_size=0, position_buckets=4)
    else:
        raise KeyError(f"unknown tiny model kind {kind!r}; pick one of {sorted(KINDS)}")
    fields.update(overrides)
    config = cls(**fields)
    config._attn_implementation = attn
    return config


def make_model(kind: str, attn: str = "eager", seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A randomly initialised tiny model in eval mode; the same ``seed`` and config give the same weights."""
    config = make_config(kind, attn, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, KINDS[kind][0])(config)
    if kind.startswith("gemma"):  # Gemma norms start at w = 0 (scale 1 + w = 1): random w makes (1 + w) matter
        with torch.no_grad():
            for module in model.modules():
                if type(module).__name__.endswith("RMSNorm"):
                    module.weight.normal_(0.0, 0.3)
    return model.eval()


def task_type(kind: str) -> str:
    return KINDS[kind][1]


def make_inputs(kind: str, batch: int = 2, seq_len: int = SEQ_LEN, seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids (never a special id) and an attention mask whose last row is right-padded by two tokens; for an
    image model (``vit``) random pixel values of its image size instead."""
    g = torch.Generator().manual_seed(seed)
    if kind in IMAGE_KINDS:
        config = make_config(kind)
        return {"pixel_values": torch.randn(batch, config.num_channels, config.image_size, config.image_size,
                                            generator=g)}
    ids = torch.randint(3, VOCAB, (batch, seq_len), generator=g)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if batch > 1:
        mask[-1, -2:] = 0
        ids[-1, -2:] = 1 if kind in ("roberta", "xlmr") else 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits under ``no_grad``, with padded positions of token-level outputs zeroed."""
    with torch.no_grad():
        out = model(**inputs).logits.float()
    if out.dim() == 3:  # causal LM: padded positions are garbage by design, compare real tokens only
        out = out * inputs["attention_mask"][..., None]
    return out


def randomize_adapters(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Give every APT factor (A and B) random values, so that the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".apt_A." in name or ".apt_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def random_masks(model: torch.nn.Module, seed: int = 0, no_heads_layer: Optional[int] = 0,
                 no_neurons_layer: Optional[int] = 1, hidden_drop: float = 0.25) -> dict[str, list[torch.Tensor]]:
    """Write random binary masks into an APT model; returns a copy of what was written.

    Layer ``no_heads_layer`` loses every head, layer ``no_neurons_layer`` every neuron; other layers keep each
    head/neuron with probability 1/2 (at least one kept and one removed when possible); ``hidden_drop`` of the
    hidden dimensions are removed.
    """
    import apt_hf

    g = torch.Generator().manual_seed(seed)
    masks = apt_hf.get_masks(model)

    def draw(n: int, zero: bool) -> torch.Tensor:
        if zero:
            return torch.zeros(n)
        m = (torch.rand(n, generator=g) < 0.5).float()
        if n >= 2:
            perm = torch.randperm(n, generator=g)
            m[perm[0]], m[perm[1]] = 1.0, 0.0
        return m

    heads = [draw(m.numel(), i == no_heads_layer) for i, m in enumerate(masks.heads)]
    neurons = [draw(m.numel(), i == no_neurons_layer) for i, m in enumerate(masks.neurons)]
    d = masks.hidden.numel()
    hidden = torch.ones(d)
    hidden[torch.randperm(d, generator=g)[: int(round(hidden_drop * d))]] = 0.0
    for i, m in enumerate(heads):
        masks.heads[i] = m
    for i, m in enumerate(neurons):
        masks.neurons[i] = m
    masks.hidden.copy_(hidden)
    return {"heads": heads, "neurons": neurons, "hidden": [hidden]}


@pytest.fixture
def tiny_model():
    """``tiny_model(kind, attn="eager", seed=0, **config_overrides)`` -> a fresh tiny model."""
    return make_model


@pytest.fixture
def tiny_inputs():
    return make_inputs


@pytest.fixture
def adapter_randomizer():
    return randomize_adapters


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread avoids OpenMP oversubscription on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(before)
