"""Architecture descriptions: where heads, neurons and hidden dimensions live, and the spec B.3 count.

``describe(model)`` walks a (PEFT-wrapped or plain) transformers model and returns a :class:`Layout` that lists
every attention site, FFN site, hidden-dimension embedding, norm and task-head reader with direct module
references. Supported: BERT, RoBERTa, LLaMA-family (MHA and grouped-query attention: LLaMA, Mistral, Qwen2) and
T5 (encoder self-attention, decoder self- and cross-attention, plain or gated FFN).

Head-mask order: the attention sites in model order; for T5 the encoder self-attentions, then for each decoder
block its self-attention followed by its cross-attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

FAMILIES = {"bert": "bert", "roberta": "bert", "llama": "llama", "mistral": "llama", "qwen2": "llama", "t5": "t5"}

# Task-head linears that read the residual stream (their input columns follow the hidden mask).
_HEAD_READERS = {
    "bert": ("pooler.dense", "classifier.dense", "qa_outputs", "lm_head.dense", "cls.predictions.transform.dense"),
    "llama": ("lm_head", "score", "qa_outputs"),
    "t5": ("lm_head",),
}
_TOKEN_LEVEL_CLASSIFIER = ("ForTokenClassification",)


class UnsupportedArchitectureError(ValueError):
    """The model is not one apt_hf knows how to prune."""


def base_linear(module: nn.Module) -> nn.Linear:
    """The plain ``nn.Linear`` inside an APT layer (or the module itself)."""
    return getattr(module, "base_layer", module)


@dataclass
class AttentionSite:
    """One attention block: its core module, projections and head geometry (current, physical)."""

    parent: nn.Module
    core_name: str
    q: Optional[nn.Module]
    k: Optional[nn.Module]
    v: Optional[nn.Module]
    o: nn.Module
    head_dim: int
    kind: str  # "self" or "cross"

    @property
    def core(self) -> nn.Module:
        return getattr(self.parent, self.core_name)

    @property
    def num_heads(self) -> int:
        return 0 if self.q is None else base_linear(self.q).out_features // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return 0 if self.k is None else base_linear(self.k).out_features // self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return max(1, self.num_heads // max(1, self.num_kv_heads))


@dataclass
class FFNSite:
    """One feed-forward block: up (and gate) projections to the neurons, down projection back."""

    up: nn.Module
    gate: Optional[nn.Module]
    down: nn.Module

    @property
    def num_neurons(self) -> int:
        return base_linear(self.up).out_features


@dataclass
class Layout:
    """Everything structural about one model (spec A.4, B)."""

    family: str
    hidden_size: int
    attentions: list[AttentionSite]
    ffns: list[FFNSite]
    embeddings: list[nn.Embedding]
    embedding_outputs: list[nn.Module]  # modules whose output gets the hidden mask
    norms: list[nn.Module]  # every norm over the residual stream
    counted_norms: list[nn.Module]  # norms that belong to the spec B.3 "main" count
    readers: list[nn.Module] = field(default_factory=list)  # task-head linears reading the residual stream
    transforms: list[nn.Module] = field(default_factory=list)  # d x d maps on both sides (distillation's Tr)

    @property
    def hidden_writers(self) -> list[nn.Module]:
        return [s.o for s in self.attentions] + [f.down for f in self.ffns]

    @property
    def hidden_readers(self) -> list[nn.Module]:
        mods = [m for s in self.attentions for m in (s.q, s.k, s.v) if m is not None]
        mods += [m for f in self.ffns for m in (f.up, f.gate) if m is not None]
        return mods + self.readers


def family_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"apt_hf does not support model_type={model_type!r} ({type(model).__name__}). Supported: "
            f"{', '.join(sorted(FAMILIES))}. Open an issue with the architecture you need."
        )
    return FAMILIES[model_type]


def _unwrap_name(name: str) -> str:
    """Drop PEFT wrapper segments (``modules_to_save.<adapter>``, ``original_module``, ``base_layer``)."""
    parts = name.split(".")
    out, skip = [], False
    for part in parts:
        if skip:
            skip = False
            continue
        if part == "modules_to_save":
            skip = True
            continue
        if part in ("original_module", "base_layer"):
            continue
        out.append(part)
    return ".".join(out)


def _find_readers(model: nn.Module, family: str) -> list[nn.Module]:
    names = _HEAD_READERS[family]
    token_level = any(tag in type(model).__name__ for tag in _TOKEN_LEVEL_CLASSIFIER)
    readers = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or "base_layer" in name.split("."):
            continue
        plain = _unwrap_name(name)
        if any(plain == n or plain.endswith("." + n) for n in names) or (token_level and plain == "classifier"):
            readers.append(module)
    return readers


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel / PEFT tuner, or the model itself."""
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, BaseTuner):
        return model.model
    inner = getattr(model, "base_model", None)
    return inner.model if isinstance(inner, BaseTuner) else model


def describe(model: nn.Module) -> Layout:
    """Return the :class:`Layout` of a transformers model (PEFT-wrapped or not)."""
    hf = _hf_model(model)
    family = family_of(hf)
    config = hf.config
    if family == "bert":
        return _describe_bert(hf, config)
    if family == "llama":
        return _describe_llama(hf, config)
    return _describe_t5(hf, config)


def _describe_bert(hf: nn.Module, config) -> Layout:
    core = hf.base_model
    head_dim = config.hidden_size // config.num_attention_heads
    attns, ffns, norms = [], [], []
    for layer in core.encoder.layer:
        att = layer.attention
        sa = att.self
        q, k, v = (getattr(sa, n, None) for n in ("query", "key", "value"))
        attns.append(AttentionSite(att, "self", q, k, v, att.output.dense, head_dim, "self"))
        ffns.append(FFNSite(layer.intermediate.dense, None, layer.output.dense))
        norms += [att.output.LayerNorm, layer.output.LayerNorm]
    emb = core.embeddings
    embeddings = [m for m in (emb.word_embeddings, getattr(emb, "position_embeddings", None),
                              getattr(emb, "token_type_embeddings", None)) if m is not None]
    return Layout("bert", emb.word_embeddings.embedding_dim, attns, ffns, embeddings, [], [emb.LayerNorm] + norms,
                  norms, _find_readers(hf, "bert"))


def _describe_llama(hf: nn.Module, config) -> Layout:
    core = hf.base_model
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attns, ffns, norms = [], [], []
    for layer in core.layers:
        sa = layer.self_attn
        q, k, v = (getattr(sa, n, None) for n in ("q_proj", "k_proj", "v_proj"))
        attns.append(AttentionSite(layer, "self_attn", q, k, v, sa.o_proj, head_dim, "self"))
        mlp = layer.mlp
        ffns.append(FFNSite(mlp.up_proj, mlp.gate_proj, mlp.down_proj))
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    norms.append(core.norm)
    return Layout("llama", core.embed_tokens.embedding_dim, attns, ffns, [core.embed_tokens], [core.embed_tokens],
                  norms, norms, _find_readers(hf, "llama"))


def _describe_t5(hf: nn.Module, config) -> Layout:
    head_dim = config.d_kv
    attns, ffns, norms = [], [], []

    def add_attention(layer: nn.Module, core_name: str, kind: str) -> None:
        a = getattr(layer, core_name)
        q, k, v = (getattr(a, n, None) for n in ("q", "k", "v"))
        attns.append(AttentionSite(layer, core_name, q, k, v, a.o, head_dim, kind))

    def add_ffn(layer: nn.Module) -> None:
        d = layer.DenseReluDense
        if hasattr(d, "wi_0"):
            ffns.append(FFNSite(d.wi_1, d.wi_0, d.wo))
        else:
            ffns.append(FFNSite(d.wi, None, d.wo))

    for block in hf.encoder.block:
        add_attention(block.layer[0], "SelfAttention", "self")
        add_ffn(block.layer[1])
        norms += [block.layer[0].layer_norm, block.layer[1].layer_norm]
    if hasattr(hf, "decoder"):
        for block in hf.decoder.block:
            add_attention(block.layer[0], "SelfAttention", "self")
            add_attention(block.layer[1], "EncDecAttention", "cross")
            add_ffn(block.layer[2])
            norms += [block.layer[0].layer_norm, block.layer[1].layer_norm, block.layer[2].layer_norm]
        norms.append(hf.decoder.final_layer_norm)
    norms.append(hf.encoder.final_layer_norm)
    embeddings = [hf.shared]
    outputs = [hf.encoder.embed_tokens] + ([hf.decoder.embed_tokens] if hasattr(hf, "decoder") else [])
    unique_outputs = list({id(m): m for m in outputs}.values())
    return Layout("t5", hf.shared.embedding_dim, attns, ffns, embeddings, unique_outputs, norms, norms,
                  _find_readers(hf, "t5"))


# ---------------------------------------------------------------------------------------------- counting (B.3)
def _has_bias(module: Optional[nn.Module]) -> int:
    return int(module is not None and base_linear(module).bias is not None)


def _norm_params_per_dim(norm: nn.Module) -> int:
    return int(getattr(norm, "weight", None) is not None) + int(getattr(norm, "bias", None) is not None)


@dataclass(frozen=True)
class CountModel:
    """Constants of the spec B.3 parameter count of one layout, so that counts of kept sets are cheap.

    The count is exact for the "main" parameters (everything except embeddings, adapters, masks and task heads):
    for BERT/RoBERTa it equals the reference formula ``d'(4 H' d_h + 2 N' + 6 L) + 3 H' d_h + N'``; for LLaMA it
    counts k/v per kept key/value group (grouped-query attention) and no biases; for T5 every projection and norm.
    """

    head_dim: tuple[int, ...]
    group_size: tuple[int, ...]
    qkv_bias: tuple[int, ...]
    o_bias: tuple[int, ...]
    ffn_mats: tuple[int, ...]  # 2 (plain) or 3 (gated) matrices per neuron
    ffn_in_bias: tuple[int, ...]  # up (+gate) biases per neuron
    down_bias: tuple[int, ...]
    norm_per_dim: int

    @classmethod
    def from_layout(cls, layout: Layout) -> "CountModel":
        a, f = layout.attentions, layout.ffns
        return cls(
            head_dim=tuple(s.head_dim for s in a),
            group_size=tuple(s.group_size for s in a),
            qkv_bias=tuple(_has_bias(s.q) for s in a),
            o_bias=tuple(_has_bias(s.o) for s in a),
            ffn_mats=tuple(3 if s.gate is not None else 2 for s in f),
            ffn_in_bias=tuple(_has_bias(s.up) + _has_bias(s.gate) for s in f),
            down_bias=tuple(_has_bias(s.down) for s in f),
            norm_per_dim=sum(_norm_params_per_dim(n) for n in layout.counted_norms),
        )

    def count(self, heads: list[torch.Tensor], neurons: list[torch.Tensor], hidden: torch.Tensor) -> int:
        """Parameters of the structure whose kept blocks are the ``True`` entries (boolean tensors)."""
        d = int(hidden.sum())
        total = self.norm_per_dim * d
        for keep, dh, g, qb, ob in zip(heads, self.head_dim, self.group_size, self.qkv_bias, self.o_bias):
            h = int(keep.sum())
            kv = h if g == 1 else int(keep.view(-1, g).any(1).sum()) if keep.numel() else 0
            total += d * dh * (2 * h + 2 * kv) + qb * dh * (h + 2 * kv) + ob * d
        for keep, c, ib, db in zip(neurons, self.ffn_mats, self.ffn_in_bias, self.down_bias):
            n = int(keep.sum())
            total += c * n * d + ib * n + db * d
        return total

    def block_costs(self, d: int) -> tuple[list[float], list[float]]:
        """Per-head and per-neuron cost at width ``d`` (spec B.3 "head" and "neuron" rows)."""
        heads = [d * dh * (2 + 2 / g) + qb * dh * (1 + 2 / g)
                 for dh, g, qb in zip(self.head_dim, self.group_size, self.qkv_bias)]
        neurons = [c * d + ib for c, ib in zip(self.ffn_mats, self.ffn_in_bias)]
        return heads, neurons

    def hidden_cost(self, heads: list[torch.Tensor], neurons: list[torch.Tensor]) -> float:
        """Cost of one hidden dimension given the kept heads and neurons (spec B.3 "dimension" row)."""
        one = torch.ones(1, dtype=torch.bool)
        return float(self.count(heads, neurons, one) - self.count(heads, neurons, one[:0]))
