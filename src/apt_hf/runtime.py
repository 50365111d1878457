"""Runtime of a transformers model whose heads, neurons and hidden width were pruned physically (spec A.4, G, K.9).

Needs only torch and transformers: apt_hf copies this file unchanged into every export (as
``apt_pruned_runtime.py``), next to the module of the model's family from :mod:`apt_hf.arch` (as
``apt_arch_<module>.py``) and a generated ``modeling_apt_pruned.py`` whose classes subclass the stock transformers
classes with :class:`PrunedModelMixin`. So a process without apt_hf loads the export with
``AutoModel….from_pretrained(folder, trust_remote_code=True)``, and apt_hf itself uses the same code (training-time
pruning, ``load_pruned``), so every route builds the same modules.

- :class:`ArchSpec`: what apt_hf knows about one architecture family (each module of :mod:`apt_hf.arch` defines
  some); :class:`Layout`: where heads, neurons and hidden dimensions live in one model, with module references.
- The grouped-query rule (:func:`heads_by_group`, :func:`kv_heads_kept`, :func:`check_group_rule`), in one place.
- Stand-ins for attentions after head pruning: :class:`EmptyAttention` (no heads left), installed by the
  ``set_heads`` helpers that family specs use.
- The record of kept sizes (``apt_pruned`` in config.json, ``apt_structure.json``): :func:`check_record`.
- :func:`shape_model`: resize a freshly built (full-size, possibly meta-device) model to a record before its
  weights load; :class:`PrunedModelMixin`: the model-class side of it, which also refuses any load that would leave
  a weight of the pruned model missing or re-initialised.

This file must not import apt_hf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

RECORD_KEY = "apt_pruned"  # the config attribute holding the record
MODEL_TYPE_PREFIX = "apt_pruned_"  # model_type of a pruned export: this prefix + the stock model_type
FORMAT_VERSION = 2  # 2: config.json routes to this code; 1: stock config.json (read by apt_hf.load_pruned only)
SUPPORTED_VERSIONS = (1, 2)
_REQUIRED = ("format_version", "family", "hidden_size", "heads", "kv_heads", "neurons")
_TOKEN_LEVEL_CLASSIFIER = ("ForTokenClassification",)
NORM_KINDS = ("layer", "rms", "rms_one_plus")  # LayerNorm, y * w RMSNorm, y * (1 + w) RMSNorm (Gemma)


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
    # a fused q/k/v projection (q = k = v, rows [q | k | v], e.g. Phi-3's qkv_proj): its (query, key/value) heads
    fused: Optional[tuple[int, int]] = None
    # further projections from the hidden width with one row block per query head, sliced with q (DeBERTa-v2's
    # pos_key_proj / pos_query_proj, which project the relative-position embeddings)
    extra: tuple[nn.Module, ...] = ()

    @property
    def core(self) -> nn.Module:
        return getattr(self.parent, self.core_name)

    @property
    def num_heads(self) -> int:
        if self.q is None:
            return 0
        return self.fused[0] if self.fused else base_linear(self.q).out_features // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        if self.k is None:
            return 0
        return self.fused[1] if self.fused else base_linear(self.k).out_features // self.head_dim

    def qkv_rows(self, q_rows: torch.Tensor, kv_rows: torch.Tensor) -> torch.Tensor:
        """Rows of the fused q/k/v projection that hold query rows ``q_rows`` and key/value rows ``kv_rows``."""
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return torch.cat([q_rows, q_width + kv_rows, q_width + kv_width + kv_rows])

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
    fused: bool = False  # gate and up are one projection (gate = up) of two halves (Phi-3's gate_up_proj)

    @property
    def num_neurons(self) -> int:
        return base_linear(self.up).out_features // (2 if self.fused else 1)

    def up_rows(self, neurons: torch.Tensor) -> torch.Tensor:
        """Rows of the up (and, fused, gate) projection that feed ``neurons``."""
        return torch.cat([neurons, self.num_neurons + neurons]) if self.fused else neurons


@dataclass
class Stack:
    """One stack of layers (spec F.3): for each layer the attention-site and FFN-site indices it holds, and the model
    output attribute with the stack's hidden states (entry 0: the embeddings, then one per layer)."""

    name: str  # "main" for single-stack models; "encoder" / "decoder" for encoder-decoder models
    layers: list[tuple[list[int], list[int]]]
    hidden_states: str = "hidden_states"


@dataclass
class Layout:
    """Everything structural about one model (spec A.4, B), built by its family's :attr:`ArchSpec.layout`.

    Head-site order: the attention sites in model order (T5: the encoder self-attentions, then for each decoder
    block its self-attention followed by its cross-attention).
    """

    spec: "ArchSpec"
    hidden_size: int
    attentions: list[AttentionSite]
    ffns: list[FFNSite]
    embeddings: list[nn.Embedding]
    embedding_outputs: list[nn.Module]  # modules whose output gets the hidden mask
    norms: list[nn.Module]  # every norm over the residual stream
    counted_norms: list[nn.Module]  # norms that belong to the spec B.3 "main" count
    readers: list[nn.Module] = field(default_factory=list)  # task-head linears reading the residual stream
    transforms: list[nn.Module] = field(default_factory=list)  # d x d maps on both sides (distillation's Tr)
    stacks: list[Stack] = field(default_factory=list)  # empty: one "main" stack, layer i = attention i + FFN i
    # where each site's residual sum is visible: (module, "in" = its first input, "out" = its first output)
    attention_sums: list[tuple[nn.Module, str]] = field(default_factory=list)
    ffn_sums: list[tuple[nn.Module, str]] = field(default_factory=list)
    # other parameters with one axis over the hidden width, (module, name, axis): ViT's patch projection, CLS token
    # and position embeddings
    hidden_params: list[tuple[nn.Module, str, int]] = field(default_factory=list)
    # hidden-width tensors a module receives as a keyword argument, (module, keyword), that are neither a residual
    # sum nor a norm's output, so the hidden mask must act on them (DeBERTa-v2's un-normalised relative-position
    # embeddings)
    hidden_kwargs: list[tuple[nn.Module, str]] = field(default_factory=list)

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def hidden_writers(self) -> list[nn.Module]:
        return [s.o for s in self.attentions] + [f.down for f in self.ffns]

    @property
    def hidden_readers(self) -> list[nn.Module]:
        mods = [m for s in self.attentions for m in (s.q, s.k, s.v, *s.extra) if m is not None]
        mods += [m for f in self.ffns for m in (f.up, f.gate) if m is not None]
        return list({id(m): m for m in mods + self.readers}.values())  # a fused projection once

    def layer_stacks(self) -> list[Stack]:
        """The stacks of layers; a model that lists none is one stack, layer ``i`` holding attention ``i`` and FFN
        ``i``."""
        if self.stacks:
            return self.stacks
        return [Stack("main", [([i], [i]) for i in range(len(self.attentions))])]


SetHeads = Callable[[Layout, int, int, int, Optional[list[int]]], None]


@dataclass(frozen=True)
class ArchSpec:
    """What apt_hf needs to know about one architecture family (see docs/ADDING_AN_ARCHITECTURE.md).

    The family's module in :mod:`apt_hf.arch` builds it; everything else in apt_hf asks it instead of branching on the
    family. The parameter count (spec B.3) follows from the layout (biases, gated FFNs and counted norms are read off
    the modules), so a spec has no formula of its own.
    """

    family: str  # the name recorded in exports
    model_types: tuple[str, ...]  # stock transformers model_type values it serves (matched in this order)
    layout: Callable[[nn.Module], Layout]  # the Layout of a transformers model of this family
    set_heads: SetHeads  # make an attention core match projections that now hold fewer (or no) heads
    target_modules: tuple[str, ...]  # default adapter targets (spec A.2)
    kind: str  # "encoder", "decoder" (causal LM) or "encoder-decoder"
    readers: tuple[str, ...] = ()  # task-head linears that read the residual stream (module-name suffixes)
    norm: str = "layer"  # kind of the residual-stream norms: one of NORM_KINDS
    kurtosis: bool = False  # default of APTConfig.use_kurtosis (spec C.2: the outlier term, used for LLMs)
    first_token_classifier: bool = False  # sequence classifiers read only the first position (mask tuning, J)
    distill_normalize: bool = False  # RMS-normalise hidden states before the layer loss (spec F.3; T5)
    head_index_key: Optional[str] = None  # record key with each attention's original head indices (T5)
    kept_heads: Optional[Callable[[nn.Module], list[int]]] = None  # those indices, from an attention core
    match: Optional[Callable[[Any], bool]] = None  # an extra test on the config (default: model_type only)

    def matches(self, config: Any) -> bool:
        """Whether this spec serves ``config`` (a transformers config or a config dict)."""
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        return stock_model_type(get("model_type")) in self.model_types and (self.match is None or self.match(config))


def find_readers(model: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    """Linears named ``names`` (suffix match, PEFT wrappers skipped), plus the classifier of a token-level
    classification model (it reads every position of the residual stream)."""
    token_level = any(tag in type(model).__name__ for tag in _TOKEN_LEVEL_CLASSIFIER)
    readers = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or "base_layer" in name.split("."):
            continue
        plain = _unwrap_name(name)
        if any(plain == n or plain.endswith("." + n) for n in names) or (token_level and plain == "classifier"):
            readers.append(module)
    return readers


def separate_qkv_attention(layer: nn.Module, head_dim: int) -> AttentionSite:
    """A decoder layer's ``self_attn`` with separate ``q_proj`` / ``k_proj`` / ``v_proj`` (absent once every head is
    gone) and ``o_proj`` inside the core."""
    sa = layer.self_attn
    q, k, v = (getattr(sa, n, None) for n in ("q_proj", "k_proj", "v_proj"))
    return AttentionSite(layer, "self_attn", q, k, v, sa.o_proj, head_dim, "self")


def gated_ffn(layer: nn.Module) -> FFNSite:
    """A decoder layer's gated ``mlp`` with ``up_proj``, ``gate_proj`` and ``down_proj``."""
    return FFNSite(layer.mlp.up_proj, layer.mlp.gate_proj, layer.mlp.down_proj)


def decoder_layout(hf: nn.Module, spec: "ArchSpec", layer_norms: Callable[[nn.Module], list[nn.Module]],
                   attention_sum: Callable[[nn.Module], nn.Module],
                   attention: Callable[[nn.Module, int], AttentionSite] = separate_qkv_attention,
                   ffn: Callable[[nn.Module], FFNSite] = gated_ffn) -> Layout:
    """The layout of a pre-norm decoder (spec A.4, B.3): ``base_model.layers`` each with its attention and FFN sites
    and its norms over the residual stream (``layer_norms``, all counted), then ``base_model.norm``. The residual sum
    after a layer's attention is the input of ``attention_sum(layer)``; the sum after its FFN is the input of the next
    layer's ``input_layernorm`` (after the last layer: ``base_model.norm``)."""
    core, config = hf.base_model, hf.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = list(core.layers)
    norms = [n for layer in layers for n in layer_norms(layer)] + [core.norm]
    after_ffn = [layer.input_layernorm for layer in layers[1:]] + [core.norm]
    return Layout(spec, core.embed_tokens.embedding_dim, [attention(layer, head_dim) for layer in layers],
                  [ffn(layer) for layer in layers], [core.embed_tokens], [core.embed_tokens], norms, norms,
                  find_readers(hf, spec.readers), attention_sums=[(attention_sum(layer), "in") for layer in layers],
                  ffn_sums=[(n, "in") for n in after_ffn])


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


# ---------------------------------------------------------------------------------------------- grouped-query rule
# Under grouped-query attention query head h reads key/value head h // g (g = query heads per key/value head); a
# pruned layer can only drop whole key/value heads, and every surviving group must keep the same number of query
# heads (HF_STACK_NOTES). Every part of apt_hf that needs the rule uses these three functions.
def heads_by_group(per_head: torch.Tensor, group_size: int) -> torch.Tensor:
    """``per_head`` (one entry per query head) viewed as ``(key/value heads, group_size)``."""
    return per_head.reshape(-1, max(1, group_size))


def kv_heads_kept(keep: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which key/value heads serve at least one kept query head (``keep``: boolean per query head)."""
    return heads_by_group(keep, group_size).any(1)


def check_group_rule(heads: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """Key/value heads that serve the kept query ``heads`` (sorted indices), and the query heads each now serves.

    Raises ``ValueError`` if the surviving groups keep different numbers of query heads."""
    if group_size == 1:
        return heads, 1
    groups, counts = torch.unique(torch.div(heads, group_size, rounding_mode="floor"), return_counts=True)
    if len(counts) and not bool((counts == counts[0]).all()):
        raise ValueError(
            f"Grouped-query attention keeps {counts.tolist()} query heads in its key/value groups {groups.tolist()}; "
            "every surviving group must keep the same number. Repair the head mask with apt_hf.prune.gqa_closure."
        )
    return groups, int(counts[0]) if len(counts) else group_size


# ---------------------------------------------------------------------------------------------- attention stand-ins
def cache_argument(kwargs: dict):
    """The key/value cache handed to an attention module: ``cache`` since transformers 5.24, ``past_key_values``
    before (the attention classes of both releases are called with one or the other)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


class EmptyAttention(nn.Module):
    """Stands in for an attention core whose heads are all gone.

    When the output projection sits outside the core (BERT), the core returns a zero-width context and the
    projection adds its bias. When it lives inside (LLaMA, DistilBERT), it is kept here under its own name
    (``o_name``); a key/value cache still receives one entry per token (a single zero of one head, one channel), so
    the cache length stays right and the cache's batch operations (``batch_repeat_interleave`` for shared-prompt
    scoring and beam search, ``batch_select_indices``) see a non-empty layer: transformers skips empty ones.
    """

    def __init__(self, o_proj: Optional[nn.Module] = None, layer_idx: Optional[int] = None,
                 o_name: str = "o_proj") -> None:
        super().__init__()
        self.layer_idx, self.o_name = layer_idx, o_name
        if o_proj is not None:
            setattr(self, o_name, o_proj)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        empty = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        if self.o_name not in self._modules:
            return empty, None
        cache = cache_argument(kwargs)
        if cache is not None:
            b, t = hidden_states.shape[:2]
            kv = hidden_states.new_zeros(b, 1, t, 1)
            cache.update(kv, kv.clone(), self.layer_idx)
        return getattr(self, self.o_name)(empty), None


def empty_attention(layout: Layout, i: int, o_inside: bool) -> None:
    """Replace attention core ``i`` by an :class:`EmptyAttention` (``o_inside``: the output projection is the
    core's child and moves into the stand-in)."""
    site = layout.attentions[i]
    core = site.core
    o_name = next((n for n, m in core.named_children() if m is site.o), "o_proj") if o_inside else "o_proj"
    setattr(site.parent, site.core_name, EmptyAttention(site.o if o_inside else None, getattr(core, "layer_idx", None),
                                                        o_name))
    site.q = site.k = site.v = None
    site.extra = ()


class ConfigView:
    """One layer's view of the model's config: ``overrides`` (e.g. a pruned attention's head count) over the shared
    config, which it reads live (so a later change of the model's config, such as its attention implementation,
    reaches every layer). For attention classes that read a pruned size from ``self.config``."""

    def __init__(self, config: Any, **overrides: Any) -> None:
        self.__dict__.update(shared=config, overrides=overrides)

    def __getattr__(self, name: str) -> Any:
        state = self.__dict__
        if name in state.get("overrides", {}):
            return state["overrides"][name]
        if "shared" not in state:  # (while unpickling)
            raise AttributeError(name)
        return getattr(state["shared"], name)


def heads_setter(count_attrs: tuple[str, ...] = (), width_attrs: tuple[str, ...] = (),
                 group_attr: Optional[str] = None, o_inside: bool = True, kv_count_attrs: tuple[str, ...] = (),
                 config_count_attrs: tuple[str, ...] = ()) -> SetHeads:
    """A ``set_heads`` for attention cores that read their head counts from attributes: ``count_attrs`` get the
    number of query heads, ``width_attrs`` heads x head_dim, ``group_attr`` the query heads per key/value head,
    ``kv_count_attrs`` the key/value heads, and ``config_count_attrs`` of the core's ``config`` (through a
    :class:`ConfigView` of its own) the query heads; an emptied core becomes an :class:`EmptyAttention`."""

    def set_heads(layout: Layout, i: int, num_heads: int, group_size: int = 1,
                  original: Optional[list[int]] = None) -> None:
        if num_heads == 0:
            empty_attention(layout, i, o_inside)
            return
        core, dh = layout.attentions[i].core, layout.attentions[i].head_dim
        for name in count_attrs:
            setattr(core, name, num_heads)
        for name in width_attrs:
            setattr(core, name, num_heads * dh)
        for name in kv_count_attrs:
            setattr(core, name, num_heads // max(1, group_size))
        if group_attr is not None:
            setattr(core, group_attr, group_size)
        if config_count_attrs:
            shared = core.config.shared if isinstance(core.config, ConfigView) else core.config
            core.config = ConfigView(shared, **{name: num_heads for name in config_count_attrs})

    return set_heads


def set_hidden_width(module: nn.Module, name: str, axis: int, width: int) -> None:
    """Keep a convolution's or linear map's size attribute in step with a hidden-width parameter resized to
    ``width``."""
    if isinstance(module, nn.modules.conv._ConvNd) and name == "weight" and axis == 0:
        module.out_channels = width
    elif isinstance(module, nn.Linear) and name == "weight":
        setattr(module, ("out_features", "in_features")[axis % 2], width)


# ---------------------------------------------------------------------------------------------- the record
def check_record(record: Any, spec: ArchSpec, source: str = "the pruned-structure record") -> dict:
    """Validate a record of kept sizes of a model of ``spec``'s family (types and format version; sizes are checked
    against the model by :func:`shape_model`). Raises ``ValueError`` naming the problem."""
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
    index_key = spec.head_index_key
    unknown = sorted(set(record) - set(_REQUIRED) - {index_key})
    if unknown:
        raise ValueError(f"{source} has unknown keys {unknown} (format_version {version}); it was written by another "
                         "apt_hf release or edited. Export the model again.")
    if record["family"] != spec.family:
        raise ValueError(f"{source} has family={record['family']!r}; config.json's model is of family "
                         f"{spec.family!r}. The export is corrupted.")

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
    if index_key is not None:
        kept = record.get(index_key)
        if not isinstance(kept, list) or len(kept) != len(record["heads"]) or any(
                not isinstance(k, list) or len(k) != n or len(set(k)) != n or not all(count(i) for i in k)
                for k, n in zip(kept, record["heads"])):
            raise ValueError(f"{source} has {index_key}={kept!r}, which disagrees with its head counts (one list of "
                             "distinct original head indices per attention); the export is corrupted.")
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
        key = layout.spec.head_index_key
        if key is not None and any(h >= site.num_heads for h in record[key][i]):
            raise _corrupted(f"has {key} {record[key][i]} at attention {i}, beyond its {site.num_heads} heads")


def shape_model(model: nn.Module, record: dict, spec: ArchSpec) -> None:
    """Resize a freshly built full-size model of ``spec``'s family to the kept sizes of ``record`` (spec G): empty
    parameters of the new shapes (on the model's device, meta included) that the export's weights then fill; tied
    weights stay tied."""
    check_record(record, spec)
    layout = spec.layout(model)
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
    for module, name, axis in layout.hidden_params:
        shape = list(getattr(module, name).shape)
        shape[axis] = d
        resize(module, name, tuple(shape))
        set_hidden_width(module, name, axis, d)
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
        if n_q and site.fused:
            linear(site.q, (n_q + 2 * n_kv) * dh, d)
        elif n_q:
            linear(site.q, n_q * dh, d)
            linear(site.k, n_kv * dh, d)
            linear(site.v, n_kv * dh, d)
        for module in site.extra if n_q else ():
            linear(module, n_q * dh, d)
        original = record[layout.spec.head_index_key][i] if layout.spec.head_index_key else None
        if n_q < full or (original is not None and original != list(range(full))):
            layout.spec.set_heads(layout, i, n_q, n_q // n_kv if n_kv else 0, original)
    for ffn, n in zip(layout.ffns, record["neurons"]):
        linear(ffn.up, 2 * n if ffn.fused else n, d)
        if ffn.gate is not None and not ffn.fused:
            linear(ffn.gate, n, d)
        linear(ffn.down, d, n)


# ---------------------------------------------------------------------------------------------- model classes
class PrunedModelMixin:
    """Put before a stock transformers model class: the model is built at the sizes of ``config.apt_pruned``, and
    ``from_pretrained`` refuses a checkpoint that would leave a weight of the pruned model missing or re-initialised
    (``ignore_mismatched_sizes=True`` may only re-initialise a task head, e.g. for a new number of labels)."""

    apt_spec: ArchSpec  # the family of the stock class (set by each subclass)

    def post_init(self) -> None:
        record = getattr(self.config, RECORD_KEY, None)
        if record is None:
            raise ValueError(f"{type(self).__name__} builds a pruned model from config.{RECORD_KEY}, which this "
                             "config lacks; load a folder written by apt_hf.export_pruned.")
        shape_model(self, record, self.apt_spec)
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
