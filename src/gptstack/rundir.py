"""The run directory: what one stage leaves for the next, in one place.

    RUN/tokenizer/                   the run's tokenizer (gptstack.json + HF tokenizer.json)
    RUN/<stage>/model.safetensors    weights (a scalar head's kind in the header), sorted header
    RUN/<stage>/config.json          the resolved config, stamped with the tokenizer's identity
    RUN/<stage>/summary.json         the stage's figures (written last: a stage with one is done)

    model, cfg, tok = load_stage("RUN/sft")            # checked to belong together
    rm, rm_cfg = load_scalar_model("RUN/rm", "reward")
    cfg = adopt_model(cfg, src_cfg)                     # a copy with the source's model sizes

Checkpoints (optimizer, RNG, step) are the training core's, in train/checkpoint.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .common import NonFiniteWeights, UserError, atomic_write_bytes, atomic_write_json, remove_stale_temps
from .config import Config, config_from_dict
from .model.gpt import GPT, rope_tables
from .model.heads import KINDS, ScalarModel, scalar_metadata, scalar_weights
from .tokenizer import Tokenizer
from .tokenizer.tokenizer import stored_identity


def check_finite(state_dict: dict, what: str) -> None:
    """Refuse to save weights holding NaN/inf: a later resume would start from them."""
    bad = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteWeights(f"{what}: {len(bad)} weight tensors hold NaN/inf ({', '.join(bad[:3])}"
                               f"{', ...' if len(bad) > 3 else ''}); not saved, the files on disk are unchanged")


def save_model(stage_dir: Path, state_dict: dict, config: dict, metadata: dict | None = None) -> None:
    """model.safetensors + config.json (the full resolved config) in `stage_dir`. `metadata`:
    extra string entries in the safetensors header (model/heads.py records its head kind there)."""
    stage_dir = Path(stage_dir)
    check_finite(state_dict, str(stage_dir / "model.safetensors"))
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    # safetensors refuses shared storage (tied embeddings): store the tied tensor once
    if "lm_head.weight" in tensors and "tok_emb.weight" in tensors and \
            state_dict["lm_head.weight"].data_ptr() == state_dict["tok_emb.weight"].data_ptr():
        del tensors["lm_head.weight"]
    data = safetensors_bytes(tensors, metadata={"format": "pt", "producer": "gptstack", **(metadata or {})})
    atomic_write_bytes(stage_dir / "model.safetensors", stable_header(data))
    write_config(stage_dir, config)


def stable_header(data: bytes) -> bytes:
    """safetensors writes its metadata in hash-map order, which differs between processes: sort
    it, so equal tensors give equal bytes (a checksum then says "changed" only when something did)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def stamped_config(stage_dir: Path, config: dict) -> dict:
    """`config` as the stage's config.json holds it: stamped with the identity of its run's tokenizer
    (`<stage>/../tokenizer`), so loading the stage with another tokenizer is refused (load_stage)."""
    if (identity := stored_identity(Path(stage_dir).parent / "tokenizer")) is not None:
        config = {**config, "tokenizer": {**config.get("tokenizer", {}), "identity": identity}}
    return config


def write_config(stage_dir: Path, config: dict) -> None:
    atomic_write_json(Path(stage_dir) / "config.json", stamped_config(stage_dir, config))


def check_tokenizer_identity(stage_dir: Path, cfg) -> None:
    """Refuse a stage whose run's tokenizer is not the one it was trained with (same size, other
    merges: every id would silently mean another string)."""
    tok_dir = Path(stage_dir).parent / "tokenizer"
    found = stored_identity(tok_dir)
    if cfg.tokenizer.identity and found is not None and found != cfg.tokenizer.identity:
        raise UserError(f"{stage_dir}: trained with tokenizer {cfg.tokenizer.identity[:19]}, but {tok_dir} is "
                        f"{found[:19]}; put the run's own tokenizer back (or retrain with --fresh)")


def adopt_tokenizer(source_dir: Path, run_dir: Path, source_name: str | None = None) -> None:
    """Give `run_dir` the tokenizer of `source_dir` (a source stage's run), so later stages find it
    in RUN/tokenizer. An existing, different tokenizer there is never overwritten: the run's
    other stages were trained with it. `source_name`: what messages call the source (default its path)."""
    source_dir, target = Path(source_dir), Path(run_dir) / "tokenizer"
    source_name = source_name or str(source_dir)
    if source_dir.resolve() == target.resolve():
        return
    want = stored_identity(source_dir)
    if want is None:
        raise UserError(f"{source_dir}: no tokenizer here (expected the run's tokenizer beside the source stage)")
    have = stored_identity(target)
    if have == want:
        return
    if have is not None:
        raise UserError(f"{target} holds another tokenizer ({have[:19]}) than {source_name} ({want[:19]}); its run's "
                        f"stages were trained with it: write to a new run directory (--out) instead")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, ".tokenizer.*.tmp")
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", suffix=".tmp", dir=target.parent))
    try:  # copied whole, then renamed: a kill leaves no half tokenizer
        shutil.copytree(source_dir, tmp, dirs_exist_ok=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_model(stage_dir: str | Path, device: str = "cpu"):
    """A stage directory -> (GPT with its weights, Config). Used by every later stage."""
    stage_dir = Path(stage_dir)
    cfg_path, weights = stage_dir / "config.json", stage_dir / "model.safetensors"
    if not weights.exists() or not cfg_path.exists():
        raise UserError(f"{stage_dir}: no model here (expected model.safetensors and config.json)")
    if (kind := scalar_kind(stage_dir)) is not None:
        raise UserError(f"{stage_dir}: this is a {kind} model (a scalar head), not a language model")
    cfg = config_from_dict(json.loads(cfg_path.read_text(encoding="utf-8")))
    check_tokenizer_identity(stage_dir, cfg)
    with torch.device("meta"):
        model = GPT(cfg.model)
    state = load_file(str(weights), device=device)
    if cfg.model.tie_embeddings:
        state.setdefault("lm_head.weight", state["tok_emb.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise UserError(f"{weights}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return _materialized(model, device), cfg


def _materialized(model: torch.nn.Module, device) -> torch.nn.Module:
    """A model built on the meta device and given the loaded tensors themselves (load_state_dict with
    assign=True: no random init of weights about to be replaced, no second copy — what makes a
    billion-parameter stage load in seconds): each GPT's tied head tied again to its embedding
    (assign gives the two their own Parameters) and its RoPE tables (buffers, not saved) computed."""
    for gpt in (m for m in model.modules() if isinstance(m, GPT)):
        if gpt.config.tie_embeddings and gpt.lm_head is not None:
            gpt.lm_head.weight = gpt.tok_emb.weight
        gpt.rope_cos, gpt.rope_sin = rope_tables(gpt.config, gpt.config.block_size, device)
    return model.to(device)


def check_vocab(model_vocab: int, tok, where, exact: bool = False) -> None:
    """The model needs a row for every id of the tokenizer; it may have more (an imported checkpoint
    padded past its tokenizer: Qwen2.5's 151,936 rows for 151,665 ids), but for `exact` (pretraining
    sizes its model by the tokenizer)."""
    if model_vocab < tok.vocab_size or (exact and model_vocab != tok.vocab_size):
        raise UserError(f"{where}: the model has vocab_size {model_vocab} but the run's tokenizer has "
                        f"{tok.vocab_size} tokens; they must come from the same run (or use --fresh)")


def check_same_tokenizer(stage_a: str | Path, stage_b: str | Path) -> None:
    """Refuse two stages whose runs' tokenizers (`<stage>/../tokenizer`) differ in ranks, special
    tokens or pre-split pattern: token ids would mean different things to the two models (a reward
    model scoring another tokenizer's policy, a reference model of another run)."""
    dirs = [Path(stage_a).parent / "tokenizer", Path(stage_b).parent / "tokenizer"]
    if dirs[0].resolve() == dirs[1].resolve():
        return
    ids = [stored_identity(d) for d in dirs]
    for d, identity in zip(dirs, ids):
        if identity is None:
            raise UserError(f"{d / 'gptstack.json'}: no tokenizer here (expected the run's tokenizer beside {d.parent})")
    if ids[0] != ids[1]:
        raise UserError(f"{stage_a} and {stage_b} use different tokenizers ({dirs[0]} is {ids[0][:19]}, {dirs[1]} is "
                        f"{ids[1][:19]}: ranks, specials or pattern differ); they must come from the same run's tokenizer")


def load_stage(stage_dir: str | Path, device: str = "cpu"):
    """A stage directory -> (model, its Config, the run's tokenizer), checked to belong together."""
    stage_dir = Path(stage_dir)
    model, cfg = load_model(stage_dir, device)
    tok = Tokenizer.load(stage_dir.parent / "tokenizer")
    check_vocab(model.config.vocab_size, tok, stage_dir)
    return model, cfg, tok


def save_scalar_model(stage_dir: str | Path, model: ScalarModel, config: dict, state_dict: dict | None = None) -> None:
    """model.safetensors (with the head's kind in its metadata) + config.json."""
    save_model(Path(stage_dir), scalar_weights(state_dict if state_dict is not None else model.state_dict()), config,
               metadata=scalar_metadata(model))


def _metadata(stage_dir: str | Path) -> dict | None:
    path = Path(stage_dir) / "model.safetensors"
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def scalar_kind(stage_dir: str | Path) -> str | None:
    """The head kind a stage's weights were saved with, or None for a language model."""
    return (_metadata(stage_dir) or {}).get("gptstack_head")


def load_scalar_model(stage_dir: str | Path, kind: str | tuple[str, ...] = KINDS, device: str = "cpu"):
    """A stage directory holding a scalar-head model -> (ScalarModel, Config). Refuses anything else
    (a language model, a PRM where a reward model is wanted) with a clear error. The model comes
    back as it was saved: with an LM head and a likelihood term where it had them."""
    stage_dir = Path(stage_dir)
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    cfg_path, weights = stage_dir / "config.json", stage_dir / "model.safetensors"
    if not weights.exists() or not cfg_path.exists():
        raise UserError(f"{stage_dir}: no model here (expected model.safetensors and config.json)")
    meta = _metadata(stage_dir) or {}
    found = meta.get("gptstack_head")
    if found not in kinds:
        what = "a language model (no scalar head)" if found is None else f"a {found} model"
        raise UserError(f"{stage_dir}: expected a {' or '.join(kinds)} model, found {what}")
    cfg = config_from_dict(json.loads(cfg_path.read_text(encoding="utf-8")))
    check_tokenizer_identity(stage_dir, cfg)
    state = load_file(str(weights), device=device)
    start = state.get("response_start_id")
    with torch.device("meta"):
        model = ScalarModel(cfg.model, found, lm_head=meta.get("gptstack_lm_head") == "true",
                            response_start_id=None if start is None else int(start))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if model.has_lm_head and cfg.model.tie_embeddings:   # stored once, as the embedding (scalar_weights)
        missing = [k for k in missing if k != "trunk.lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"{weights}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return _materialized(model, device), cfg


def load_scalar_head(stage_dir: str | Path, device: str = "cpu") -> dict:
    """A scalar-head model's own tensors (head, likelihood coefficient, response-start id), without
    its trunk: what turns another model sharing that trunk back into this one (PPO's RM beside a LoRA
    critic started from it)."""
    path = Path(stage_dir) / "model.safetensors"
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        return {k: f.get_tensor(k) for k in f.keys() if not k.startswith("trunk.")}


def adopt_model(cfg: Config, source: Config) -> Config:
    """A copy of `cfg` whose model section is the source stage's (the sizes its weights have); the
    caller's Config is left as it was."""
    return dataclasses.replace(cfg, model=dataclasses.replace(source.model))


def write_summary(stage_dir: str | Path, summary: dict) -> None:
    """summary.json, written last by a stage: its presence marks the stage done."""
    atomic_write_json(Path(stage_dir) / "summary.json", summary)


def weights_digest(stage_dir: str | Path) -> str:
    """sha256 of a stage's model.safetensors (equal weights give equal bytes: the header is sorted)."""
    h = hashlib.sha256()
    with open(Path(stage_dir) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
