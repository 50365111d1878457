"""Runtime of a transformers model whose heads, neurons and hidden width were pruned physically (spec A.4, G, K.9).

Needs only torch and transformers: apt_hf copies this file unchanged into every export (as
``apt_pruned_runtime.py``), next to a generated ``modeling_apt_pruned.py`` whose classes subclass the stock
transformers classes of the model's family with :class:`PrunedModelMixin`. So a process without apt_hf loads the
export with ``AutoModel….from_pretrained(folder, trust_remote_code=True)``, and apt_hf itself uses the same code
(training-time pruning, ``load_pruned``), so every route builds the same modules.

- :func:`layout_of`: where heads, neurons and hidden dimensions live in a BERT, RoBERTa, LLaMA-family (LLaMA,
  Mistral, Qwen2; grouped-query attention too) or T5 model.
- Stand-ins for attentions after head pruning: :class:`EmptyAttention` (BERT/LLaMA attention with no heads left),
  :class:`PrunedT5Attention` and :class:`EmptyT5Attention` (T5 blocks that keep different heads slice the shared
  relative position bias to their own), installed by :func:`set_heads`.
- The record of kept sizes (``apt_pruned`` in config.json, ``apt_structure.json``): :func:`check_record`.
- :func:`shape_model`: resize a freshly built (full-size, possibly meta-device) model to a record before its
  weights load; :class:`PrunedModelMixin`: the model-class side of it, which also refuses any load that would leave
  a weight of the pruned model missing or re-initialised.

This file must not import apt_hf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.t5.modeling_t5 import T5Attention

# model_type -> family
FAMILIES = {"bert": "bert", "roberta": "bert", "llama": "llama", "mistral": "llama", "qwen2": "llama", "t5": "t5"}
RECORD_KEY = "apt_pruned"  # the config attribute holding the record
MODEL_TYPE_PREFIX = "apt_pruned_"  # model_type of a pruned export: this prefix + the stock model_type
FORMAT_VERSION = 2  # 2: config.json routes to this code; 1: stock config.json (read by apt_hf.load_pruned only)
SUPPORTED_VERSIONS = (1, 2)
_REQUIRED = ("format_version", "family", "hidden_size", "heads", "kv_heads", "neurons")
_OPTIONAL = ("t5_kept_heads",)

# Task-head linears that read the residual stream (their input columns follow the hidden width).
HEAD_READERS = {
    "bert": ("pooler.dense", "classifier.dense", "qa_outputs", "lm_head.dense", "cls.predictions.transform.dense"),
    "llama": ("lm_head", "score", "qa_outputs"),
    "t5": ("lm_head",),
}
_TOKEN_LEVEL_CLASSIFIER = ("ForTokenClassification",)


# ---------------------------------------------------------------------------------------------- layout
def stock_model_type(model_type: Optional[str]) -> Optional[str]:
    """The stock model_type of a pruned export's (``apt_pruned_bert`` -> ``bert``); others unchanged."""
    return model_type[len(MODEL_TYPE_PREFIX):] if (model_type or "").startswith(MODEL_TYPE_PREFIX) else model_type


def base_linear(module: nn.Module) -> nn.Linear:
    """The plain ``nn.Linear`` inside an adapter layer (or the module itself)."""
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
    """Everything structural about one model (spec A.4, B).

    Head-site order: the attention sites in model order; for T5 the encoder self-attentions, then for each decoder
    block its self-attention followed by its cross-attention.
    """

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


def _unwrap_name(name: str) -> str:
    """Drop PEFT wrapper segments (``modules_to_save.<adapter>``, ``original_module``, ``base_layer``)."""
    out, skip = [], False
    for part in name.split("."):
        if skip:
            skip = False
        elif part == "modules_to_save":
            skip = True
        elif part not in ("original_module", "base_layer"):
            out.append(part)
    return ".".join(out)


def _find_readers(model: nn.Module, family: str) -> list[nn.Module]:
    names = HEAD_READERS[family]
    token_level = any(tag in type(model).__name__ for tag in _TOKEN_LEVEL_CLASSIFIER)
    readers = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or "base_layer" in name.split("."):
            continue
        plain = _unwrap_name(name)
        if any(plain == n or plain.endswith("." + n) for n in names) or (token_level and plain == "classifier"):
            readers.append(module)
    return readers


def layout_of(hf: nn.Module, family: str) -> Layout:
    """The :class:`Layout` of a transformers model of ``family`` (``"bert"``, ``"llama"`` or ``"t5"``)."""
    return {"bert": _bert_layout, "llama": _llama_layout, "t5": _t5_layout}[family](hf, hf.config)


def _bert_layout(hf: nn.Module, config) -> Layout:
    core = hf.base_model
    head_dim = config.hidden_size // config.num_attention_heads
    attns, ffns, norms = [], [], []
    for layer in core.encoder.layer:
        att = layer.attention
        q, k, v = (getattr(att.self, n, None) for n in ("query", "key", "value"))
        attns.append(AttentionSite(att, "self", q, k, v, att.output.dense, head_dim, "self"))
        ffns.append(FFNSite(layer.intermediate.dense, None, layer.output.dense))
        norms += [att.output.LayerNorm, layer.output.LayerNorm]
    emb = core.embeddings
    embeddings = [m for m in (emb.word_embeddings, getattr(emb, "position_embeddings", None),
                              getattr(emb, "token_type_embeddings", None)) if m is not None]
    return Layout("bert", emb.word_embeddings.embedding_dim, attns, ffns, embeddings, [], [emb.LayerNorm] + norms,
                  norms, _find_readers(hf, "bert"))


def _llama_layout(hf: nn.Module, config) -> Layout:
    core = hf.base_model
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attns, ffns, norms = [], [], []
    for layer in core.layers:
        sa = layer.self_attn
        q, k, v = (getattr(sa, n, None) for n in ("q_proj", "k_proj", "v_proj"))
        attns.append(AttentionSite(layer, "self_attn", q, k, v, sa.o_proj, head_dim, "self"))
        ffns.append(FFNSite(layer.mlp.up_proj, layer.mlp.gate_proj, layer.mlp.down_proj))
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    norms.append(core.norm)
    return Layout("llama", core.embed_tokens.embedding_dim, attns, ffns, [core.embed_tokens], [core.embed_tokens],
                  norms, norms, _find_readers(hf, "llama"))


def _t5_layout(hf: nn.Module, config) -> Layout:
    attns, ffns, norms = [], [], []

    def add_attention(layer: nn.Module, core_name: str, kind: str) -> None:
        a = getattr(layer, core_name)
        q, k, v = (getattr(a, n, None) for n in ("q", "k", "v"))
        attns.append(AttentionSite(layer, core_name, q, k, v, a.o, config.d_kv, kind))

    def add_ffn(layer: nn.Module) -> None:
        d = layer.DenseReluDense
        ffns.append(FFNSite(d.wi_1, d.wi_0, d.wo) if hasattr(d, "wi_0") else FFNSite(d.wi, None, d.wo))

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
    outputs = [hf.encoder.embed_tokens] + ([hf.decoder.embed_tokens] if hasattr(hf, "decoder") else [])
    unique_outputs = list({id(m): m for m in outputs}.values())
    return Layout("t5", hf.shared.embedding_dim, attns, ffns, [hf.shared], unique_outputs, norms, norms,
                  _find_readers(hf, "t5"))


# ---------------------------------------------------------------------------------------------- attention stand-ins
def cache_argument(kwargs: dict):
    """The key/value cache handed to an attention module: ``cache`` since transformers 5.24, ``past_key_values``
    before (the attention classes of both releases are called with one or the other)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


class EmptyAttention(nn.Module):
    """Stands in for a BERT or LLaMA attention core whose heads are all gone.

    BERT's output projection sits outside the core, so the core returns a zero-width context and the projection
    adds its bias. LLaMA's ``o_proj`` lives inside the core and is kept here under its own name; the layer's
    key/value cache still receives zero-head entries so the cache length (and generation positions) stay right.
    """

    def __init__(self, family: str, o_proj: Optional[nn.Module] = None, layer_idx: Optional[int] = None,
                 head_dim: int = 0) -> None:
        super().__init__()
        self.family, self.layer_idx, self.head_dim = family, layer_idx, head_dim
        if o_proj is not None:
            self.o_proj = o_proj

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        empty = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        if self.family == "bert":
            return empty, None
        cache = cache_argument(kwargs)
        if cache is not None:
            b, t = hidden_states.shape[:2]
            kv = hidden_states.new_zeros(b, 0, t, self.head_dim)
            cache.update(kv, kv.clone(), self.layer_idx)
        return self.o_proj(empty), None


# T5 computes its relative position bias once, in the first block's self-attention (``relative_attention_bias``,
# one column per head), and hands the (1, H, q, k) tensor to every later block; the decoder's first cross-attention
# likewise creates a zero bias that later cross-attentions reuse. Once blocks keep different heads, each block needs
# the rows of *its* heads, while the tensor handed on must stay over all H original heads. The two subclasses below
# do that; they are installed by swapping the class of the existing module, so state-dict keys stay stock T5's.
KEPT_HEADS_ATTR = "apt_kept_heads"  # original indices of the heads a T5 attention keeps (a tuple of ints)


def _original_heads(module: T5Attention) -> int:
    return int(module.config.num_heads)


def _select_heads(module: nn.Module, bias: torch.Tensor) -> torch.Tensor:
    """Rows of a bias over all original heads that belong to this module's kept heads."""
    if bias.shape[1] == 1:  # broadcast bias
        return bias
    if bias.shape[1] != _original_heads(module):
        raise ValueError(f"T5 position bias has {bias.shape[1]} heads; expected the model's "
                         f"{_original_heads(module)} original heads (or 1).")
    return bias.index_select(1, torch.tensor(getattr(module, KEPT_HEADS_ATTR), device=bias.device))


class PrunedT5Attention(T5Attention):
    """A ``T5Attention`` that keeps only the heads ``apt_kept_heads`` (original indices) of the model: it uses its
    rows of an incoming (or self-computed, or created zero) position bias and hands the full bias on."""

    def compute_bias(self, query_length, key_length, device=None, past_seen_tokens=0):
        full = super().compute_bias(query_length, key_length, device=device, past_seen_tokens=past_seen_tokens)
        self.__dict__["_apt_full_bias"] = full
        return _select_heads(self, full)

    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, **kwargs):
        incoming = position_bias
        self.__dict__["_apt_full_bias"] = None
        if incoming is not None:
            position_bias = _select_heads(self, incoming)
        try:
            out, used, weights = super().forward(hidden_states, mask=mask, key_value_states=key_value_states,
                                                 position_bias=position_bias, **kwargs)
            if incoming is not None:
                full = incoming
            elif self.__dict__["_apt_full_bias"] is not None:
                full = self.__dict__["_apt_full_bias"]
            else:  # a zero bias created for this block's heads: hand on zeros over all original heads
                full = used.new_zeros((used.shape[0], _original_heads(self), *used.shape[2:]))
                full.requires_grad_(used.requires_grad)
        finally:
            self.__dict__["_apt_full_bias"] = None
        return out, full, weights


class EmptyT5Attention(T5Attention):
    """A ``T5Attention`` with no heads left: outputs ``o`` of nothing (zeros), still provides the shared position
    bias when it owns ``relative_attention_bias`` (or creates the zero cross-attention bias), and in a decoder
    self-attention keeps its cache layer's length right (a one-element placeholder per position), which generation
    and block 0's relative positions read."""

    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, **kwargs):
        batch, q_len = hidden_states.shape[:2]
        is_cross = key_value_states is not None
        key_length = key_value_states.shape[1] if is_cross else q_len
        past_seen = 0
        cache = cache_argument(kwargs)
        if cache is not None and not is_cross:
            if isinstance(cache, EncoderDecoderCache):
                cache = cache.self_attention_cache
            past_seen = cache.get_seq_length(self.layer_idx)
            placeholder = hidden_states.new_zeros(batch, 1, q_len, 1)
            keys, _ = cache.update(placeholder, placeholder, self.layer_idx)
            key_length = keys.shape[-2]
        if position_bias is None:
            if self.has_relative_attention_bias:
                position_bias = self.compute_bias(q_len, key_length, device=hidden_states.device,
                                                  past_seen_tokens=past_seen)
            else:
                position_bias = hidden_states.new_zeros((1, _original_heads(self), q_len, key_length))
        out = self.o(hidden_states.new_zeros(*hidden_states.shape[:-1], 0))
        return out, position_bias, None


def t5_kept_heads(module: nn.Module) -> list[int]:
    """Original head indices still present in a T5 attention core (all of them if it was never pruned)."""
    if isinstance(module, EmptyT5Attention):
        return []
    kept = getattr(module, KEPT_HEADS_ATTR, None)
    return list(range(int(module.n_heads))) if kept is None else list(kept)


def set_heads(layout: Layout, i: int, num_heads: int, group_size: int = 1,
              t5_kept: Optional[list[int]] = None) -> None:
    """Make attention core ``i`` match projections that now hold ``num_heads`` query heads (``group_size`` per
    key/value head; ``t5_kept``: their original indices in a T5 model); an empty attention gets its stand-in."""
    site = layout.attentions[i]
    core, dh = site.core, site.head_dim
    if layout.family == "t5":
        if num_heads == 0:
            for name in ("q", "k", "v"):
                if name in core._modules:
                    delattr(core, name)
            core.__class__ = EmptyT5Attention
        elif not isinstance(core, PrunedT5Attention):
            core.__class__ = PrunedT5Attention
        core.n_heads, core.inner_dim = num_heads, num_heads * dh
        setattr(core, KEPT_HEADS_ATTR, tuple(int(h) for h in t5_kept))
    elif num_heads == 0:
        llama = layout.family == "llama"
        setattr(site.parent, site.core_name, EmptyAttention(layout.family, site.o if llama else None,
                                                            getattr(core, "layer_idx", None), dh))
    elif layout.family == "bert":
        core.num_attention_heads, core.all_head_size = num_heads, num_heads * dh
    else:
        core.num_key_value_groups = group_size
    if num_heads == 0:
        site.q = site.k = site.v = None


# ---------------------------------------------------------------------------------------------- the record
def check_record(record: Any, source: str = "the pruned-structure record") -> dict:
    """Validate a record of kept sizes (types and format version; sizes are checked against the model by
    :func:`shape_model`). Raises ``ValueError`` naming the problem."""
    if not isinstance(record, dict):
        raise ValueError(f"{source} lacks {list(_REQUIRED)}: it is not a JSON object. The export is corrupted.")
    version = record.get("format_version")
    if "format_version" in record and version not in SUPPORTED_VERSIONS:
        raise ValueError(f"{source} has format_version={version!r}, but this code reads versions "
                         f"{list(SUPPORTED_VERSIONS)}. It was written by another apt_hf release: load it with the "
                         "apt_hf version that exported it, or upgrade apt_hf (pip install -U apt_hf).")
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise ValueError(f"{source} lacks {missing}; the export is corrupted or incomplete.")
    unknown = sorted(set(record) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ValueError(f"{source} has unknown keys {unknown} (format_version {version}); it was written by another "
                         "apt_hf release or edited. Export the model again.")
    if record["family"] not in FAMILIES.values():
        raise ValueError(f"{source} has family={record['family']!r}; expected one of "
                         f"{sorted(set(FAMILIES.values()))}. The export is corrupted.")

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    for key in ("heads", "kv_heads", "neurons"):
        if not isinstance(record[key], list) or not all(count(v) for v in record[key]):
            raise ValueError(f"{source} has {key}={record[key]!r}; it must be a list of non-negative integers, "
                             "one per site. The export is corrupted.")
    if not count(record["hidden_size"]):
        raise ValueError(f"{source} has hidden_size={record['hidden_size']!r}; it must be a non-negative "
                         "integer. The export is corrupted.")
    if len(record["kv_heads"]) != len(record["heads"]):
        raise ValueError(f"{source} lists {len(record['heads'])} heads entries but {len(record['kv_heads'])} "
                         "kv_heads entries; the export is corrupted.")
    kept = record.get("t5_kept_heads")
    if (record["family"] == "t5") != (kept is not None):
        raise ValueError(f"{source} must hold t5_kept_heads exactly when family is 't5'; the export is corrupted.")
    if kept is not None and (not isinstance(kept, list) or len(kept) != len(record["heads"]) or any(
            not isinstance(k, list) or len(k) != n or len(set(k)) != n or not all(count(i) for i in k)
            for k, n in zip(kept, record["heads"]))):
        raise ValueError(f"{source} has t5_kept_heads that disagree with its head counts; the export is corrupted.")
    return record


# ---------------------------------------------------------------------------------------------- shaping
def _corrupted(what: str) -> ValueError:
    return ValueError(f"The pruned-structure record {what}; the export is corrupted.")


def _check_sizes(layout: Layout, record: dict) -> None:
    """The record fits this (freshly built, full-size) model."""
    heads, neurons = record["heads"], record["neurons"]
    if len(heads) != len(layout.attentions) or len(neurons) != len(layout.ffns):
        raise _corrupted(f"describes {len(heads)} attention and {len(neurons)} FFN sites but config.json builds "
                         f"{len(layout.attentions)} and {len(layout.ffns)}")
    full = ([s.num_heads for s in layout.attentions], [f.num_neurons for f in layout.ffns], [layout.hidden_size])
    for key, want, have in zip(("heads", "neurons", "hidden_size"), (heads, neurons, [record["hidden_size"]]), full):
        if any(w > f for w, f in zip(want, have)):
            raise _corrupted(f"has {key} {want}, more than config.json's unpruned model has ({have})")
    for i, (site, n_q, n_kv) in enumerate(zip(layout.attentions, heads, record["kv_heads"])):
        if (n_q == 0) != (n_kv == 0) or (n_kv and (n_q % n_kv or n_q // n_kv > site.group_size
                                                   or n_kv > site.num_kv_heads)):
            raise _corrupted(f"asks for {n_q} query / {n_kv} key-value heads at attention {i}, which this "
                             "architecture cannot hold")
        if site.group_size == 1 and n_q != n_kv:
            raise _corrupted(f"asks for {n_q} query / {n_kv} key-value heads at multi-head attention {i}")
        kept = record.get("t5_kept_heads")
        if kept is not None and any(h >= site.num_heads for h in kept[i]):
            raise _corrupted(f"has t5_kept_heads {kept[i]} at attention {i}, beyond its {site.num_heads} heads")


def shape_model(model: nn.Module, record: dict) -> None:
    """Resize a freshly built full-size model to the kept sizes of ``record`` (spec G): empty parameters of the new
    shapes (on the model's device, meta included) that the export's weights then fill; tied weights stay tied."""
    check_record(record)
    layout = layout_of(model, record["family"])
    _check_sizes(layout, record)
    d = record["hidden_size"]
    made: dict[int, nn.Parameter] = {}

    def resize(module: nn.Module, name: str, shape: tuple[int, ...]) -> None:
        old = getattr(module, name, None)
        if old is None:
            return
        if id(old) not in made:  # (a parameter made here maps to itself: a module listed twice is resized once)
            new = nn.Parameter(old.new_empty(shape), requires_grad=old.requires_grad)
            made[id(old)] = made[id(new)] = new
        setattr(module, name, made[id(old)])

    def linear(module: nn.Module, out_features: Optional[int], in_features: int) -> None:
        out_features = module.out_features if out_features is None else out_features
        resize(module, "weight", (out_features, in_features))
        resize(module, "bias", (out_features,))
        module.out_features, module.in_features = out_features, in_features

    for emb in layout.embeddings + [m for m in layout.embedding_outputs if isinstance(m, nn.Embedding)]:
        resize(emb, "weight", (emb.num_embeddings, d))
        emb.embedding_dim = d
    for norm in layout.norms:
        resize(norm, "weight", (d,))
        resize(norm, "bias", (d,))
        if hasattr(norm, "normalized_shape"):
            norm.normalized_shape = (d,)
    for reader in layout.readers:
        linear(reader, None, d)
    for i, (site, n_q, n_kv) in enumerate(zip(layout.attentions, record["heads"], record["kv_heads"])):
        dh, full = site.head_dim, site.num_heads
        linear(site.o, d, n_q * dh)
        if n_q:
            linear(site.q, n_q * dh, d)
            linear(site.k, n_kv * dh, d)
            linear(site.v, n_kv * dh, d)
        t5_kept = record["t5_kept_heads"][i] if layout.family == "t5" else None
        if n_q < full or (t5_kept is not None and t5_kept != list(range(full))):
            set_heads(layout, i, n_q, n_q // n_kv if n_kv else 0, t5_kept)
    for ffn, n in zip(layout.ffns, record["neurons"]):
        linear(ffn.up, n, d)
        if ffn.gate is not None:
            linear(ffn.gate, n, d)
        linear(ffn.down, d, n)


# ---------------------------------------------------------------------------------------------- model classes
class PrunedModelMixin:
    """Put before a stock transformers model class: the model is built at the sizes of ``config.apt_pruned``, and
    ``from_pretrained`` refuses a checkpoint that would leave a weight of the pruned model missing or re-initialised
    (``ignore_mismatched_sizes=True`` may only re-initialise a task head, e.g. for a new number of labels)."""

    def post_init(self) -> None:
        record = getattr(self.config, RECORD_KEY, None)
        if record is None:
            raise ValueError(f"{type(self).__name__} builds a pruned model from config.{RECORD_KEY}, which this "
                             "config lacks; load a folder written by apt_hf.export_pruned.")
        shape_model(self, record)
        super().post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        check_loading(model, info)
        return (model, info) if want_info else model


def check_loading(model: nn.Module, info: dict) -> None:
    """Refuse a load that left any weight of the pruned model at its random initial value (spec G)."""
    prefix = getattr(model, "base_model_prefix", "")
    task_model = bool(prefix) and hasattr(model, prefix)  # a backbone under a task head

    def backbone(key: str) -> bool:
        return not task_model or key.startswith(prefix + ".")

    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])]
    same_class = type(model).__name__ in (getattr(model.config, "architectures", None) or [])
    bad = {
        "missing from the weights": [k for k in info.get("missing_keys", []) if same_class or backbone(k)],
        "of another shape in the weights": [k for k in mismatched if backbone(k)],
        "in the weights but not in the model": list(info.get("unexpected_keys", [])) if same_class else [],
    }
    problems = [f"{len(keys)} tensors {what} ({sorted(keys)[:5]})" for what, keys in bad.items() if keys]
    if problems:
        raise ValueError(f"This pruned model does not match its weights: {'; '.join(problems)}. A pruned layer cannot "
                         "be re-initialised at random (ignore_mismatched_sizes does not apply to it); the export is "
                         "incomplete or corrupted. Export it again with apt_hf.export_pruned.")
