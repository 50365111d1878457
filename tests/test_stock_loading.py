"""A pruned export loads with stock transformers in a process without apt_hf (issue 16 items 1, 2, 6; spec G, K.9).

One export per supported family (BERT, RoBERTa, LLaMA with multi-head and grouped-query attention and as a
classifier, Mistral, Qwen2, T5 and the later families of FAMILIES), each with an attention that lost every head (for
T5: both block-0 self-attentions, which own the shared position bias, and a cross-attention) and, except T5, an FFN
that lost every neuron, is written here with a tokenizer (ViT: an image processor; its pipeline reads a PNG file). A
fresh ``python -c`` process in which ``import apt_hf`` is impossible loads each one through
``AutoModel…from_pretrained(folder, trust_remote_code=True)`` and ``pipeline``, generates, and tries the loads that
must be refused. Everything is compared with ``apt_hf.load_pruned`` (tolerance 1e-4).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from conftest import IMAGE_KINDS, VOCAB, logits, make_config, make_inputs, make_model, random_masks, randomize_adapters
from test_t5 import _inputs as t5_inputs
from test_t5 import _masked_peft as t5_masked_peft

import apt_hf
from apt_hf.export import STRUCTURE_FILE

TOL = 1e-4
TEXT = "w5 w9 w13 w40 w77"
PIPELINE_KWARGS = {"text-classification": {"top_k": None}, "image-classification": {"top_k": 3},
                   "text-generation": {"max_new_tokens": 4, "do_sample": False, "return_full_text": False}}

# name -> (model class, PEFT task type, auto class, pipeline task)
FAMILIES = {
    "bert": ("BertForSequenceClassification", "SEQ_CLS", "AutoModelForSequenceClassification", "text-classification"),
    "roberta": ("RobertaForSequenceClassification", "SEQ_CLS", "AutoModelForSequenceClassification",
                "text-classification"),
    "llama_mha": ("LlamaForCausalLM", "CAUSAL_LM", "AutoModelForCausalLM", "text-generation"),
    "llama_gqa": ("LlamaForCausalLM", "CAUSAL_LM", "AutoModelForCausalLM", "text-generation"),
    "llama_cls": ("LlamaForSequenceClassification", "SEQ_CLS", "AutoModelForSequenceClassification",
                  "text-classification"),
    "llama_tied": ("LlamaForCausalLM", "CAUSAL_LM", "AutoModelForCausalLM", "text-generation"),
    "mistral": ("MistralForCausalLM", "CAUSAL_LM", "AutoModelForCausalLM", "text-generation"),
    "qwen2": ("Qwen2ForCausalLM", "CAUSAL_LM", "AutoModelForCausalLM", "text-generation"),
    "t5": ("T5ForConditionalGeneration", "SEQ_2_SEQ_LM", "AutoModelForSeq2SeqLM", None),
    "xlmr": ("XLMRobertaForSequenceClassification", "SEQ_CLS", "AutoModelForSequenceClassification",
             "text-classification"),
    "qwen3": ("Qwen3ForCausalLM", "CAUSAL_LM", "AutoModelForCausalLM", "text-generation"),
    "gemma2": ("Gemma2ForCausalLM", "CAUSAL_LM", "AutoModelForCausalLM", "text-generation"),
    "gemma3": ("Gemma3ForCausalLM", "CAUSAL_LM", "AutoModelForCausalLM", "text-generation"),
    "distilbert": ("DistilBertForSequenceClassification", "SEQ_CLS", "AutoModelForSequenceClassification",
                   "text-classification"),
    "vit": ("ViTForImageClassification", "SEQ_CLS", "AutoModelForImageClassification", "image-classification"),
    "phi3": ("Phi3ForCausalLM", "CAUSAL_LM", "AutoModelForCausalLM", "text-generation"),
    "modernbert": ("ModernBertForSequenceClassification", "SEQ_CLS", "AutoModelForSequenceClassification",
                   "text-classification"),
    "deberta_v2": ("DebertaV2ForSequenceClassification", "SEQ_CLS", "AutoModelForSequenceClassification",
                   "text-classification"),
    "deberta_v3": ("DebertaV2ForSequenceClassification", "SEQ_CLS", "AutoModelForSequenceClassification",
                   "text-classification"),
}
TIED = ("llama_tied", "t5", "gemma2", "gemma3")

SCRIPT = r'''
import json, sys
sys.modules["apt_hf"] = None  # any "import apt_hf" now fails: nothing below may need it
import torch, transformers

jobs = json.load(open(sys.argv[1]))
results = {}


def attempt(name, call):
    try:
        results[name] = {"ok": call()}
    except Exception as err:
        results[name] = {"error": type(err).__name__, "message": str(err)}


for job in jobs["loads"]:
    model = getattr(transformers, job["auto"]).from_pretrained(job["dir"], trust_remote_code=True).eval()
    inputs = torch.load(job["inputs"])
    head = model.get_output_embeddings()
    out = {"class": type(model).__name__, "stock_bases": [c.__name__ for c in type(model).__mro__],
           "tied": head is not None and head.weight is model.get_input_embeddings().weight}
    with torch.no_grad():
        out["logits"] = model(**inputs["forward"]).logits
        if job["generate"]:
            gen = model.generate(**inputs["generate"], **job["generate"], do_sample=False, max_new_tokens=5,
                                 return_dict_in_generate=True, output_logits=True)
            out["sequences"], out["gen_logits"] = gen.sequences, torch.stack(gen.logits)
    if job["task"]:
        pipe = transformers.pipeline(job["task"], model=job["dir"], trust_remote_code=True)
        out["pipeline"] = pipe(job["text"], **job["pipeline_kwargs"])
    results[job["name"]] = out

Auto = transformers.AutoModelForSequenceClassification
attempt("no_trust", lambda: type(Auto.from_pretrained(jobs["bert"])).__name__)
attempt("no_trust_ignore", lambda: type(Auto.from_pretrained(jobs["bert"], ignore_mismatched_sizes=True)).__name__)
attempt("no_trust_pipeline", lambda: type(transformers.pipeline("text-classification", model=jobs["bert"])).__name__)
attempt("wrong_shapes_ignore", lambda: type(Auto.from_pretrained(jobs["wrong_shapes"], trust_remote_code=True,
                                                                  ignore_mismatched_sizes=True)).__name__)
attempt("wrong_shapes", lambda: type(Auto.from_pretrained(jobs["wrong_shapes"], trust_remote_code=True)).__name__)
attempt("backbone", lambda: transformers.AutoModel.from_pretrained(jobs["bert"], trust_remote_code=True).eval()(
    **torch.load(jobs["bert_inputs"])["forward"]).last_hidden_state.detach())
attempt("new_head", lambda: Auto.from_pretrained(jobs["bert"], trust_remote_code=True, num_labels=5,
                                                 ignore_mismatched_sizes=True).classifier.out_features)
attempt("no_lm_head", lambda: type(transformers.AutoModelForCausalLM.from_pretrained(
    jobs["no_lm_head"], trust_remote_code=True)).__name__)


def load_adapter():
    import peft
    base = Auto.from_pretrained(jobs["adapter_base"])
    return type(peft.PeftModel.from_pretrained(base, jobs["adapter"])).__name__


attempt("adapter", load_adapter)
results["apt_hf_imported"] = sys.modules.get("apt_hf") is not None
torch.save(results, sys.argv[2])
'''


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary: "<pad>"=0, "<s>"=1, "</s>"=2, "w3".."w100"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", model_input_names=["input_ids", "attention_mask"])


def make_image_processor() -> transformers.BaseImageProcessor:
    """An image processor for the tiny ViT: any image becomes 3 x 8 x 8 pixel values."""
    return transformers.ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=0.5, image_std=0.5)


def make_image(path: Path) -> str:
    """A random 16 x 16 RGB image saved as a PNG file; returns its path (what an image pipeline reads)."""
    from PIL import Image

    pixels = torch.randint(0, 256, (16, 16, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return str(path)


def family_model(name: str) -> transformers.PreTrainedModel:
    if name == "llama_tied":
        return make_model("llama_mha", tie_word_embeddings=True)
    if name in ("mistral", "qwen2"):
        fields = make_config("llama_gqa").to_dict()
        fields = {k: v for k, v in fields.items() if k not in ("model_type", "architectures", "transformers_version")}
        config = getattr(transformers, FAMILIES[name][0].replace("ForCausalLM", "Config"))(**fields)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        return getattr(transformers, FAMILIES[name][0])(config).eval()
    return make_model(name)


def masked_apt_model(name: str) -> tuple[peft.PeftModel, dict]:
    """A tiny APT model with random adapters and random binary masks, and its forward inputs."""
    if name == "t5":
        return t5_masked_peft("gated-gelu", "eager", "bias_owners_empty"), t5_inputs()
    pm = peft.get_peft_model(family_model(name), apt_hf.APTConfig(task_type=FAMILIES[name][1]))
    randomize_adapters(pm, seed=11)
    random_masks(pm, seed=4)  # layer 0 loses every head, layer 1 every neuron
    kind = {"mistral": "llama_gqa", "qwen2": "llama_gqa", "llama_tied": "llama_mha"}.get(name, name)
    return pm.eval(), make_inputs(kind)


def generate_kwargs(name: str) -> dict:
    if name == "t5":
        return {"suppress_tokens": [0, 1]}
    return {"pad_token_id": 0} if FAMILIES[name][1] == "CAUSAL_LM" else {}


def generate(model, inputs: dict, name: str):
    with torch.no_grad():
        return model.generate(**inputs, **generate_kwargs(name), do_sample=False, max_new_tokens=5,
                              return_dict_in_generate=True, output_logits=True)


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """Exports, what apt_hf.load_pruned gives for them, and what the fresh process without apt_hf gave."""
    root = tmp_path_factory.mktemp("stock")
    tok, image_processor = make_tokenizer(), make_image_processor()
    image = make_image(root / "image.png")
    jobs, expected = {"loads": []}, {}
    for name, (_, _, auto, task) in FAMILIES.items():
        pm, forward = masked_apt_model(name)
        folder = root / name
        processor = image_processor if name in IMAGE_KINDS else tok
        text = image if name in IMAGE_KINDS else TEXT
        apt_hf.export_pruned(pm, folder, tokenizer=processor)
        loaded = apt_hf.load_pruned(folder)
        with torch.no_grad():
            exp = {"masked": pm(**forward).logits, "logits": loaded(**forward).logits}
        head = loaded.get_output_embeddings()
        exp["tied"] = head is not None and head.weight is loaded.get_input_embeddings().weight
        inputs = {"forward": forward}
        if FAMILIES[name][1] != "SEQ_CLS":
            inputs["generate"] = ({"input_ids": forward["input_ids"]} if name == "t5"
                                  else {k: v[:1] for k, v in forward.items()})
            exp["generation"] = generate(loaded, inputs["generate"], name)
        if task:
            exp["pipeline"] = transformers.pipeline(task, model=loaded, **{
                "image_processor" if name in IMAGE_KINDS else "tokenizer": processor})(text, **PIPELINE_KWARGS[task])
        torch.save(inputs, root / f"{name}.pt")
        jobs["loads"].append({"name": name, "dir": str(folder), "auto": auto, "task": task, "text": text,
                              "inputs": str(root / f"{name}.pt"), "pipeline_kwargs": PIPELINE_KWARGS.get(task),
                              "generate": generate_kwargs(name) if "generate" in inputs else None})
        expected[name] = exp
    jobs["bert"], jobs["bert_inputs"] = str(root / "bert"), str(root / "bert.pt")
    with torch.no_grad():
        expected["backbone"] = apt_hf.load_pruned(root / "bert").bert(**torch.load(root / "bert.pt")["forward"])

    # merge_and_unload().save_pretrained() of a model pruned in place (as at pruning events) and merged after
    pm, forward = masked_apt_model("llama_gqa")
    apt_hf.find_apt_model(pm).prune_to_masks()
    with torch.no_grad():
        expected["merged"] = {"masked": pm(**forward).logits}
        merged = pm.merge_and_unload()
        expected["merged"]["merged"] = merged(**forward).logits
    merged.save_pretrained(root / "merged")
    expected["merged"]["logits"] = logits(apt_hf.load_pruned(root / "merged"), forward)
    torch.save({"forward": forward}, root / "merged.pt")
    jobs["loads"].append({"name": "merged", "dir": str(root / "merged"), "auto": "AutoModelForCausalLM", "task": None,
                          "inputs": str(root / "merged.pt"), "generate": None})

    # damaged exports: structure and weights disagree; an untied lm_head is missing from the weights
    shutil.copytree(root / "bert", root / "wrong_shapes")
    config = json.loads((root / "wrong_shapes" / "config.json").read_text())
    config["apt_pruned"]["neurons"][2] -= 1
    (root / "wrong_shapes" / "config.json").write_text(json.dumps(config))
    jobs["wrong_shapes"] = str(root / "wrong_shapes")
    jobs["no_lm_head"] = str(drop_tensor(root / "llama_gqa", root / "no_lm_head", "lm_head.weight"))

    # an APT adapter, saved with PEFT
    pm, _ = masked_apt_model("bert")
    make_model("bert").save_pretrained(root / "adapter_base")
    pm.save_pretrained(root / "adapter")
    jobs["adapter_base"], jobs["adapter"] = str(root / "adapter_base"), str(root / "adapter")

    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(root / "modules"), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(root / "jobs.json"), str(root / "results.pt")],
                          env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, expected, torch.load(root / "results.pt", weights_only=False)


def drop_tensor(source: Path, target: Path, name: str) -> Path:
    """A copy of an export whose weights file lacks ``name``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    state = load_file(str(target / "model.safetensors"))
    del state[name]
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def masked_logits(out: torch.Tensor, forward: dict) -> torch.Tensor:
    return out * forward["attention_mask"][..., None] if out.dim() == 3 and "attention_mask" in forward else out


@pytest.mark.slow  # one subprocess for the whole module (about 10 s of it is the child's imports)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_stock_transformers_loads_the_pruned_model(stock, name):
    root, expected, results = stock
    exp, got = expected[name], results[name]
    forward = torch.load(root / f"{name}.pt")["forward"]
    assert not results["apt_hf_imported"]
    assert got["class"] == "AptPruned" + FAMILIES[name][0] and FAMILIES[name][0] in got["stock_bases"]
    assert got["tied"] == exp["tied"] == (name in TIED)
    assert (masked_logits(exp["logits"] - exp["masked"], forward)).abs().max() <= TOL  # load_pruned is exact
    assert (masked_logits(got["logits"] - exp["logits"], forward)).abs().max() <= TOL
    if "generation" in exp:
        assert torch.equal(got["sequences"], exp["generation"].sequences)
        assert (got["gen_logits"] - torch.stack(exp["generation"].logits)).abs().max() <= TOL
    task = FAMILIES[name][3]
    if task in ("text-classification", "image-classification"):
        want = {d["label"]: d["score"] for d in exp["pipeline"]}
        assert {d["label"] for d in got["pipeline"]} == set(want)
        assert max(abs(d["score"] - want[d["label"]]) for d in got["pipeline"]) <= TOL
    elif task == "text-generation":
        assert got["pipeline"] == exp["pipeline"] and got["pipeline"][0]["generated_text"].strip()
    # the export folder: remote code, record, tokenizer and a model card that says how to load it
    folder = root / name
    card = (folder / "README.md").read_text()
    assert "trust_remote_code=True" in card and "apt_hf.load_pruned" in card and "heads kept" in card
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"].startswith("apt_pruned_") and config["apt_pruned"]["heads"][0] == 0
    listed = json.loads((folder / STRUCTURE_FILE).read_text())["files"]
    processor = "preprocessor_config.json" if name in IMAGE_KINDS else "tokenizer.json"
    assert {"modeling_apt_pruned.py", "apt_pruned_runtime.py", "README.md", processor} <= set(listed)
    arch_file = next(f for f in listed if f.startswith("apt_arch_"))  # the family's module of apt_hf.arch
    for code in ("modeling_apt_pruned.py", "apt_pruned_runtime.py", arch_file):
        assert not re.search(r"^\s*(import|from)\s+apt_hf", (folder / code).read_text(), re.M)


@pytest.mark.slow
def test_auto_model_loads_the_pruned_backbone(stock):
    _, expected, results = stock
    assert (results["backbone"]["ok"] - expected["backbone"].last_hidden_state).abs().max() <= TOL


@pytest.mark.slow
def test_loading_without_trust_remote_code_is_refused(stock):
    _, _, results = stock
    for case in ("no_trust", "no_trust_ignore", "no_trust_pipeline"):
        assert results[case].get("error") == "ValueError", results[case]
        assert "trust_remote_code=True" in results[case]["message"]


@pytest.mark.slow
def test_ignore_mismatched_sizes_never_reinitialises_pruned_weights(stock):
    _, _, results = stock
    refused = results["wrong_shapes_ignore"]
    assert refused.get("error") == "ValueError" and "of another shape" in refused["message"], refused
    assert "error" in results["wrong_shapes"]  # transformers' own size check
    assert results["new_head"] == {"ok": 5}  # a new task head may be initialised: that is what the flag is for


@pytest.mark.slow
def test_missing_untied_lm_head_is_refused_by_both_loaders(stock):
    root, _, results = stock
    assert results["no_lm_head"].get("error") == "ValueError"
    assert "missing" in results["no_lm_head"]["message"] and "lm_head.weight" in results["no_lm_head"]["message"]
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        apt_hf.load_pruned(root / "no_lm_head")


@pytest.mark.slow
def test_merge_and_unload_save_pretrained_round_trips(stock):
    """Issue 16 item 2: the usual PEFT export of a physically pruned model loads with both loaders."""
    root, expected, results = stock
    exp = expected["merged"]
    forward = torch.load(root / "merged.pt")["forward"]
    for key in ("merged", "logits"):
        assert masked_logits(exp[key] - exp["masked"], forward).abs().max() <= TOL
    assert masked_logits(results["merged"]["logits"] - exp["masked"], forward).abs().max() <= TOL
    assert results["merged"]["class"] == "AptPrunedLlamaForCausalLM"


@pytest.mark.slow
def test_apt_adapter_without_apt_hf_names_the_package(stock):
    """Issue 16 item 6: PEFT's KeyError is the peft type, which says what to install and import; the adapter's model
    card says it too."""
    root, _, results = stock
    assert results["adapter"].get("error") == "KeyError"
    assert "pip install apt_hf; import apt_hf" in results["adapter"]["message"]
    card = (root / "adapter" / "README.md").read_text()
    assert "import apt_hf" in card and "disable_adapter()" in card
    assert json.loads((root / "adapter" / "adapter_config.json").read_text())["peft_type"] == \
        apt_hf.config.APT_PEFT_TYPE


def test_stock_class_named_explicitly_fails_its_size_check(tmp_path):
    """The route the folder cannot guard (README): a stock class reads config.json as its own type, builds the
    unpruned sizes and refuses the pruned weights (unless told to re-initialise them)."""
    pm, _ = masked_apt_model("bert")
    apt_hf.export_pruned(pm, tmp_path / "export")
    with pytest.raises(RuntimeError, match="size mismatch|ignore_mismatched_sizes"):
        transformers.BertForSequenceClassification.from_pretrained(tmp_path / "export")


def test_adapter_saved_with_the_old_peft_type_still_loads(tmp_path):
    pm, forward = masked_apt_model("bert")
    pm.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["peft_type"] = "APT"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    again = peft.PeftModel.from_pretrained(make_model("bert"), tmp_path / "adapter").eval()
    assert (logits(again, forward) - logits(pm, forward)).abs().max() <= TOL


def test_merge_and_unload_prunes_what_the_masks_remove(tmp_path):
    """merge_and_unload() of a masked model (nothing removed physically yet) returns the model the masks describe."""
    pm, forward = masked_apt_model("bert")
    ref = logits(pm, forward)
    merged = pm.merge_and_unload()
    assert isinstance(merged, transformers.BertForSequenceClassification)
    assert (logits(merged, forward) - ref).abs().max() <= TOL
    assert sum(p.numel() for p in merged.parameters()) < sum(p.numel() for p in make_model("bert").parameters())
    merged.save_pretrained(tmp_path / "merged")
    assert (logits(apt_hf.load_pruned(tmp_path / "merged"), forward) - ref).abs().max() <= TOL
    with pytest.raises(ValueError, match="push_to_hub"):
        merged.save_pretrained(tmp_path / "pushed", push_to_hub=True)


def test_pruned_model_pickles():
    pm, forward = masked_apt_model("llama_cls")
    merged = pm.merge_and_unload()
    again = pickle.loads(pickle.dumps(merged))
    assert type(again) is type(merged) and type(again.config) is type(merged.config)
    assert torch.equal(logits(again, forward), logits(merged, forward))


def test_unpruned_merge_loads_with_stock_from_pretrained(tmp_path):
    """At density 1 merge_and_unload() is a stock model, and load_pruned's pointer to from_pretrained is right."""
    pm = peft.get_peft_model(make_model("bert"), apt_hf.APTConfig(task_type="SEQ_CLS"))
    randomize_adapters(pm)
    forward = make_inputs("bert")
    ref = logits(pm, forward)
    merged = pm.merge_and_unload()
    assert type(merged) is transformers.BertForSequenceClassification
    merged.save_pretrained(tmp_path / "dense")
    stock = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "dense")
    assert (logits(stock, forward) - ref).abs().max() <= TOL
    with pytest.raises(FileNotFoundError, match="never pruned.*from_pretrained"):
        apt_hf.load_pruned(tmp_path / "dense")


def test_stock_families_do_not_read_per_layer_config():
    """Why exports ship remote code rather than transformers' per_layer_config (5.24+): the supported families read
    their head counts from the global config, so a per-layer override makes their construction fail. If this test
    starts failing, upstream supports it and exports could drop the remote code for that family."""
    if not hasattr(transformers.PretrainedConfig, "per_layer_config"):
        pytest.skip("this transformers release predates per_layer_config")
    from transformers.integrations.heterogeneity import AmbiguousGlobalPerLayerAttributeError

    for kind in ("bert", "llama_gqa"):
        with pytest.raises(AmbiguousGlobalPerLayerAttributeError):
            make_model(kind, per_layer_config={0: {"num_attention_heads": 2}})


def test_format1_export_still_loads_and_is_replaced(tmp_path):
    """An export written before this layout (stock config.json, record version 1, tokenizer saved next to it by
    run_glue) loads with load_pruned, and overwrite=True replaces it."""
    pm, forward = masked_apt_model("bert")
    ref = logits(pm, forward)
    old = tmp_path / "old"
    apt_hf.export_pruned(pm, old, tokenizer=make_tokenizer())
    config = json.loads((old / "config.json").read_text())
    for key in ("apt_pruned", "apt_training", "auto_map"):
        config.pop(key)
    config.update(model_type="bert", architectures=["BertForSequenceClassification"])
    (old / "config.json").write_text(json.dumps(config))
    record = json.loads((old / STRUCTURE_FILE).read_text())
    record.pop("files")
    (old / STRUCTURE_FILE).write_text(json.dumps(dict(record, format_version=1)))
    for name in ("modeling_apt_pruned.py", "apt_pruned_runtime.py", "apt_arch_bert.py", "README.md"):
        (old / name).unlink()
    loaded = apt_hf.load_pruned(old)
    assert (logits(loaded, forward) - ref).abs().max() <= TOL
    loaded.save_pretrained(tmp_path / "rewritten")  # in this layout
    assert json.loads((tmp_path / "rewritten" / "config.json").read_text())["model_type"] == "apt_pruned_bert"
    assert json.loads((tmp_path / "rewritten" / STRUCTURE_FILE).read_text())["format_version"] == 2
    assert (logits(apt_hf.load_pruned(tmp_path / "rewritten"), forward) - ref).abs().max() <= TOL
    apt_hf.export_pruned(pm, old, overwrite=True)
    assert "tokenizer.json" not in {p.name for p in old.iterdir()}
    assert (logits(apt_hf.load_pruned(old), forward) - ref).abs().max() <= TOL
