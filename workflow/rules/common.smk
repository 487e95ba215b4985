# Validation, naming of outputs, input functions and targets. Only this file holds Python
# helpers; the rules call the get_* functions below (no lambdas in rules).

import hashlib
import json
import re
from pathlib import Path

from snakemake.utils import validate


validate(config, schema="../schemas/config.schema.yaml")

RES = str(Path(config["resources_dir"]))
MODELS = {m["slug"]: m for m in config["models"]}
if len(MODELS) != len(config["models"]):
    raise ValueError("config: model slugs must be unique")

PPL_SETS = {s["name"]: s for s in config["eval"]["perplexity"]}
if len(PPL_SETS) != len(config["eval"]["perplexity"]):
    raise ValueError("config: perplexity set names must be unique")

PAPER_PRUNER_NAMES = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}

# Output names: every path carries what determines it, as a short hash of the settings.
VARIANT_RE = r"(magnitude|wanda|sparsegpt)_([0-9]+pct|[0-9]+-[0-9]+)_(none|dr-[0-9a-f]{8})|none_dense_dr-[0-9a-f]{8}"
ROW_RE = rf"[a-z0-9][a-z0-9.-]*/(dense|c-[0-9a-f]{{8}}/({VARIANT_RE})(/lora-[0-9a-f]{{8}})?)"


def short_hash(settings) -> str:
    """8 hex digits of the sha256 of the settings' canonical JSON."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def pattern_slug(pattern: str) -> str:
    """'50%' -> '50pct', '2:4' -> '2-4' (file-name safe, reversible)."""
    return pattern.replace("%", "pct").replace(":", "-")


def pattern_from_slug(slug: str) -> str:
    return slug.replace("pct", "%").replace("-", ":")


# ---------------------------------------------------------------------------------------------
# settings that determine each kind of output


def calibration_settings() -> dict:
    return {k: config["calibration"][k] for k in ("source", "nsamples", "seqlen", "seed", "mode")}


def calib_id() -> str:
    return f"c-{short_hash(calibration_settings())}"


def loss_score_for(pruner: str) -> str:
    """Score the rotation loss uses: configured, else the pruner's own (wanda when nothing is pruned)."""
    score = config["rotation"]["loss_score"]
    if score:
        return score
    return "wanda" if pruner == "none" else pruner


def rotation_settings(pruner: str) -> dict:
    settings = {k: config["rotation"][k] for k in ("steps", "lr", "clip", "loss_variant", "seed")}
    settings["loss_score"] = loss_score_for(pruner)
    settings["percdamp"] = config["pruning"]["percdamp"]
    return settings


def rotation_slug(pruner: str, rotation: str) -> str:
    return "none" if rotation == "none" else f"dr-{short_hash(rotation_settings(pruner))}"


def variant_name(pruner: str, pattern: str | None, rotation: str) -> str:
    if pruner == "none":
        return f"none_dense_{rotation_slug('none', 'denoise')}"
    return f"{pruner}_{pattern_slug(pattern)}_{rotation_slug(pruner, rotation)}"


def parse_variant(variant: str) -> dict:
    """Pruner, pattern and rotation of a variant name; refuses names from other settings."""
    pruner, pslug, rslug = variant.split("_", 2)
    rotation = "none" if rslug == "none" else "denoise"
    pattern = None if pruner == "none" else pattern_from_slug(pslug)
    expected = variant_name(pruner, pattern, rotation)
    if variant != expected:
        raise ValueError(f"{variant} was made with other rotation settings than the config's ({expected})")
    return {"pruner": pruner, "pattern": pattern, "rotation": rotation}


def lora_settings() -> dict:
    return {"lora": dict(config["finetune"]["lora"]), "train": dict(config["finetune"]["train"])}


def lora_id() -> str:
    return short_hash(lora_settings())


def ppl_settings(name: str) -> dict:
    s = PPL_SETS[name]
    return {"dataset": s["dataset"], "seqlen": s["seqlen"], "max_windows": s["max_windows"]}


def ppl_id(name: str) -> str:
    return short_hash(ppl_settings(name))


def zeroshot_settings() -> dict:
    z = config["eval"]["zeroshot"]
    settings = {"tasks": list(z["tasks"]), "source": z["source"], "limit": z["limit"]}
    if z["source"] == "local":
        settings["fixtures"] = {"items": z["fixture_items"], "seed": z["fixture_seed"], "corpus": corpus_dir()}
    return settings


def zeroshot_id() -> str:
    return short_hash(zeroshot_settings())


# ---------------------------------------------------------------------------------------------
# assets


def corpus_dir() -> str:
    source = config["corpus"]["source"]
    return str(Path(source.split(":", 1)[1])) if source.startswith("local:") else f"{RES}/corpus"


def corpus_inputs(spec: str) -> list:
    """The corpus folder when a data source names it (corpus:NAME), so the fetch runs first."""
    return [corpus_dir()] if spec.startswith("corpus:") else []


def resolve_source(spec: str) -> str:
    """corpus:NAME -> json:<corpus>/NAME.jsonl; every other source is the package's own syntax."""
    if spec.startswith("corpus:"):
        return f"json:{corpus_dir()}/{spec.split(':', 1)[1]}.jsonl"
    return spec


def fixtures_dir() -> str:
    z = config["eval"]["zeroshot"]
    return f"{RES}/zeroshot-tasks/items{z['fixture_items']}-seed{z['fixture_seed']}-{short_hash(corpus_dir())}"


def base_model_dir(model: str) -> str:
    source = MODELS[model]["source"]
    if source.startswith("local:"):
        return str(Path(source.split(":", 1)[1]))
    return f"{RES}/models/{model}"


# ---------------------------------------------------------------------------------------------
# the grid


def grid_rows() -> list[dict]:
    """One entry per table row: model, pruner, pattern, rotation, finetune and its path id."""
    rows = []
    calib = calib_id()
    for model in MODELS:
        if config["dense"]:
            rows.append(dict(model=model, pruner="none", pattern="dense", rotation="none", finetune="none",
                             row=f"{model}/dense"))
        for pruner in config["pruners"]:
            for pattern in config["patterns"]:
                for rotation in config["rotations"]:
                    rows.append(dict(model=model, pruner=pruner, pattern=pattern, rotation=rotation,
                                     finetune="none",
                                     row=f"{model}/{calib}/{variant_name(pruner, pattern, rotation)}"))
        if config["rotation_only"]:
            rows.append(dict(model=model, pruner="none", pattern="dense", rotation="denoise", finetune="none",
                             row=f"{model}/{calib}/{variant_name('none', None, 'denoise')}"))
        for ft in config["finetune"]["rows"]:
            variant = variant_name(ft["pruner"], ft["pattern"], ft["rotation"])
            rows.append(dict(model=model, pruner=ft["pruner"], pattern=ft["pattern"], rotation=ft["rotation"],
                             finetune="lora", row=f"{model}/{calib}/{variant}/lora-{lora_id()}"))
    return rows


def row_model_dir(row: str) -> str:
    model, rest = row.split("/", 1)
    return base_model_dir(model) if rest == "dense" else f"results/models/{row}/hf"


def row_stats(row: str) -> list:
    """Per-layer statistics of a row (the prune stage's; a LoRA row's come from its base)."""
    parts = row.split("/")
    if parts[1] == "dense":
        return []
    return [f"results/models/{parts[0]}/{parts[1]}/{parts[2]}/stats.json"]


def ppl_file(row: str, name: str) -> str:
    return f"results/eval/{row}/ppl-{name}-{ppl_id(name)}.json"


def zeroshot_file(row: str) -> str:
    return f"results/eval/{row}/zeroshot-{zeroshot_id()}.json"


def row_outputs(entry: dict) -> dict:
    row = entry["row"]
    out = {"sparsity": f"results/eval/{row}/sparsity.json",
           "ppl": {name: ppl_file(row, name) for name in PPL_SETS},
           "stats": (row_stats(row) or [None])[0]}
    if config["eval"]["zeroshot"]["tasks"]:
        out["zeroshot"] = zeroshot_file(row)
    return out


def get_table_manifest(wildcards=None) -> dict:
    """Everything tables.py needs: rows with their files, and the settings shown with the table."""
    rows = [{**entry, "paper_name": MODELS[entry["model"]]["paper_name"], "files": row_outputs(entry)}
            for entry in grid_rows()]
    return {
        "rows": rows,
        "perplexity": {name: {"paper": s["paper"], "note": s["note"], **ppl_settings(name)}
                       for name, s in PPL_SETS.items()},
        "zeroshot": zeroshot_settings(),
        "calibration": calibration_settings(),
        "rotation": {k: config["rotation"][k] for k in ("steps", "lr", "clip", "loss_variant", "seed")},
        "finetune": lora_settings() if config["finetune"]["rows"] else None,
    }


def get_table_inputs(wildcards) -> list:
    files = []
    for row in get_table_manifest()["rows"]:
        f = row["files"]
        files.extend([f["sparsity"], *f["ppl"].values()])
        files.extend([f["zeroshot"]] if "zeroshot" in f else [])
        files.extend([f["stats"]] if f["stats"] else [])
    return sorted(set(files))


def get_final_targets() -> list:
    return ["results/tables/main.csv", "results/tables/main.parquet", "results/tables/main.md",
            "results/tables/ppl.png", "results/tables/entropy.png"]


# ---------------------------------------------------------------------------------------------
# input functions


def get_fetch_params(wildcards) -> dict:
    m = MODELS[wildcards.model]
    return {"source": m["source"], "num_layers": m["num_layers"]}


def get_calib_inputs(wildcards) -> dict:
    return {"model": base_model_dir(wildcards.model), "corpus": corpus_inputs(config["calibration"]["source"])}


def get_calib_params(wildcards) -> dict:
    return {**calibration_settings(), "source": resolve_source(config["calibration"]["source"])}


def model_dtype(model: str) -> str:
    return MODELS[model]["dtype"] or config["compute"]["dtype"]


def get_prune_params(wildcards) -> dict:
    """Only what determines this row: rotation settings are left out of plain-pruning rows so that
    changing them never reruns those (Snakemake's params trigger)."""
    v = parse_variant(wildcards.variant)
    params = {
        "pruner": v["pruner"], "pattern": v["pattern"], "rotation": v["rotation"],
        "percdamp": config["pruning"]["percdamp"],
        "sparsegpt_blocksize": config["pruning"]["sparsegpt_blocksize"],
        "device": config["compute"]["device"], "dtype": model_dtype(wildcards.model),
        "batch_size": config["compute"]["prune_batch_size"],
    }
    if v["rotation"] == "denoise":
        rot = rotation_settings(v["pruner"])
        params.update({k: rot[k] for k in ("steps", "lr", "clip", "loss_variant", "seed", "loss_score")})
    return params


def get_prune_inputs(wildcards) -> dict:
    if wildcards.calib != calib_id():
        raise ValueError(f"{wildcards.calib} was made with other calibration settings ({calib_id()})")
    return {"model": base_model_dir(wildcards.model),
            "calib": f"results/calib/{wildcards.model}/{wildcards.calib}.pt"}


def get_finetune_inputs(wildcards) -> dict:
    return {"model": f"results/models/{wildcards.model}/{wildcards.calib}/{wildcards.variant}/hf",
            "corpus": corpus_inputs(config["finetune"]["train"]["source"])}


def get_finetune_params(wildcards) -> dict:
    if wildcards.ft != lora_id():
        raise ValueError(f"lora-{wildcards.ft} was made with other LoRA settings (lora-{lora_id()})")
    return {**config["finetune"]["lora"], **config["finetune"]["train"],
            "source": resolve_source(config["finetune"]["train"]["source"]),
            "device": config["compute"]["device"], "dtype": model_dtype(wildcards.model)}


def get_eval_model(wildcards) -> str:
    return row_model_dir(wildcards.row)


def get_ppl_inputs(wildcards) -> dict:
    if wildcards.set not in PPL_SETS or wildcards.pplid != ppl_id(wildcards.set):
        raise ValueError(f"ppl-{wildcards.set}-{wildcards.pplid} does not match the configured sets")
    return {"model": row_model_dir(wildcards.row), "corpus": corpus_inputs(PPL_SETS[wildcards.set]["dataset"])}


def get_ppl_params(wildcards) -> dict:
    s = ppl_settings(wildcards.set)
    return {**s, "dataset": resolve_source(s["dataset"]), "device": config["compute"]["device"],
            "batch_size": config["compute"]["eval_batch_size"]}


def get_zeroshot_inputs(wildcards) -> dict:
    if wildcards.zsid != zeroshot_id():
        raise ValueError(f"zeroshot-{wildcards.zsid} does not match the configured tasks ({zeroshot_id()})")
    inputs = {"model": row_model_dir(wildcards.row)}
    if config["eval"]["zeroshot"]["source"] == "local":
        inputs["fixtures"] = fixtures_dir()
    return inputs


def get_zeroshot_params(wildcards) -> dict:
    z = config["eval"]["zeroshot"]
    return {"tasks": ",".join(z["tasks"]), "limit": z["limit"], "batch_size": z["batch_size"],
            "device": config["compute"]["device"]}


# ---------------------------------------------------------------------------------------------
# resources: scaled by the model's size (params_b), overridable per model and step


def _model_of(wildcards) -> dict:
    name = wildcards.model if hasattr(wildcards, "model") else wildcards.row.split("/", 1)[0]
    return MODELS[name]


def _override(wildcards, step: str, key: str):
    return _model_of(wildcards)["resources"].get(step, {}).get(key)


def _uses_gpu() -> bool:
    return config["compute"]["device"].startswith("cuda") or config["compute"]["gpus"] > 0


def get_threads(step: str):
    def threads(wildcards) -> int:
        return _override(wildcards, step, "threads") or config["compute"]["threads"]
    return threads


def get_gpu(step: str):
    def gpu(wildcards) -> int:
        value = _override(wildcards, step, "gpu")
        return value if value is not None else config["compute"]["gpus"]
    return gpu


def get_mem_mb(step: str):
    """Host memory. The stages keep the whole model on the host in its dtype (4 bytes per parameter
    in float32, 2 in bfloat16) and move one layer at a time to the GPU; prune also holds the
    calibration activations (three copies of nsamples x seqlen x hidden, hidden <= 8192)."""
    def mem_mb(wildcards, attempt) -> int:
        value = _override(wildcards, step, "mem_mb")
        if value:
            return value * attempt
        model = _model_of(wildcards)
        gb = model["params_b"] * (4.0 if model_dtype(model["slug"]) == "float32" else 2.0)
        calib = config["calibration"]
        activations = calib["nsamples"] * calib["seqlen"] * 8192 * 4 * 3 / 1e9 if step == "prune" else 0.0
        factor = {"prune": 1.3, "finetune": 2.5, "perplexity": 1.2, "zeroshot": 1.2, "sparsity": 1.2}.get(step, 1.2)
        return int(1024 * (gb * factor + min(activations, 64.0) + 3.0)) * attempt
    return mem_mb


def get_runtime(step: str):
    """Minutes. Rotation: 0.124 s per step per layer on an A100 for an 8B model (paper), scaled
    linearly with size; 1.5x margin. Other stages: a few minutes per billion parameters."""
    def runtime(wildcards, attempt) -> int:
        value = _override(wildcards, step, "runtime")
        if value:
            return value * attempt
        size = _model_of(wildcards)["params_b"]
        minutes = 20 + 6 * size
        if step == "prune" and parse_variant(wildcards.variant)["rotation"] == "denoise":
            minutes += 1.5 * config["rotation"]["steps"] * 0.124 * 32 * (size / 8.0) / 60
        elif step == "finetune":
            minutes += 10 * size * config["finetune"]["lora"]["steps"] / 1024
        if not _uses_gpu():
            minutes *= 20  # CPU-only runs are far slower; generous so a cluster never kills them
        return int(minutes) * attempt
    return runtime
