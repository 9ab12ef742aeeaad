# Config validation, path helpers and the params every rule shares.

import os
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

import bismap

validate(config, schema="../config/schema.yaml")

DOMAINS = ["source", "target_train", "target_val"]
CODE_VERSION = bismap.CODE_VERSION
CONDA_ENV = "../envs/bismap.yaml"


def results(*parts):
    """A path under this run's results folder."""
    return os.path.join(config["results"], *parts)


def log_path(rule_name, *wildcards):
    return results("logs", rule_name, *wildcards) + ".log"


def domain_settings(domain):
    return config["datasets"][domain]


def dataset_root(domain):
    """Generated folder for the embedded benchmark, else the configured dataset root."""
    settings = domain_settings(domain)
    if settings["format"] == "digit_scenes":
        return results("data", "digit_scenes", domain)
    return settings["root"]


def check_declared_paths():
    """Fail before any job starts when a configured dataset or weight file is missing."""
    problems = []
    for domain in DOMAINS:
        settings = domain_settings(domain)
        if settings["format"] != "digit_scenes":
            root = settings.get("root")
            if not root or not os.path.isdir(root):
                problems.append(f"datasets.{domain}.root: folder {root!r} does not exist")
    imagenet = config.get("pretrained", {}).get("imagenet")
    if imagenet and not os.path.isfile(imagenet):
        problems.append(f"pretrained.imagenet: file {imagenet!r} does not exist (see README: pretrained weights)")
    embedding = config.get("stm", {}).get("embedding_checkpoint")
    if config.get("stm", {}).get("enabled", False) and embedding and not os.path.isfile(embedding):
        problems.append(f"stm.embedding_checkpoint: file {embedding!r} does not exist (see README: STM)")
    if problems:
        raise WorkflowError("configuration names missing inputs:\n  " + "\n  ".join(problems))


check_declared_paths()


def index_inputs(wildcards):
    """Only the generated benchmark is a workflow product; real roots are checked up front."""
    if domain_settings(wildcards.domain)["format"] == "digit_scenes":
        return [dataset_root(wildcards.domain)]
    return []


def pretrained_inputs(wildcards):
    imagenet = config.get("pretrained", {}).get("imagenet")
    return {"imagenet": imagenet} if imagenet else {}


def gpa_settings():
    """The gpa section (schema defaults filled in); a config without one has GPA disabled."""
    return config.get("gpa", {})


def gpa_enabled():
    return bool(gpa_settings().get("enabled", False))


def gpa_inputs(wildcards):
    """Target photometric statistics for the source loader when GPA is on (BiSMAP Sec. 3.5)."""
    return {"photometric_statistics": results("gpa", "target_statistics.json")} if gpa_enabled() else {}


def oracle_enabled():
    return bool(config.get("oracle", {}).get("enabled", False))


def evaluated_models():
    """The report's rows in pipeline order (selftrain_* and distill come from rules/selftrain.smk, distill.smk)."""
    models = ["warmup"] + [f"selftrain_{name}" for name in selftrain_variants()]
    models += ["distill"] if distill_enabled() else []
    return models + (["oracle"] if oracle_enabled() else [])


def model_components():
    """Per report row, the components it uses (BiSMAP Table 4 columns)."""
    components = {}
    for name, variant in selftrain_variants().items():
        components[f"selftrain_{name}"] = {"maps": variant["maps"], "stm": variant["stm"],
                                           "consistency": variant["consistency"], "distillation": False}
    if distill_enabled():
        components["distill"] = {**components[f"selftrain_{distill_teacher()}"], "distillation": True}
    return components


def maps_settings():
    """The maps section (schema defaults filled in); a config without one has MAPs disabled."""
    return config.get("maps", {})


def maps_enabled():
    return bool(maps_settings().get("enabled", False))


def class_ids():
    """Train ids 0..C-1: one fit_class_gmm job each."""
    return list(range(len(config["classes"])))


def maps_shards():
    """Shard indices of the pseudo_labels jobs."""
    return list(range(int(maps_settings().get("shards", 1))))


def maps_pseudo_label_settings():
    """PseudoLabelSettings of the MAPs labels."""
    return {**maps_settings().get("pseudo_labels", {}), "strategy": "maps"}


def pseudo_label_settings(labels):
    """PseudoLabelSettings of one pseudo-label set: 'maps' or 'baseline' (selftrain.baseline_pseudo_labels)."""
    if labels == "maps":
        return maps_pseudo_label_settings()
    return {**config.get("selftrain", {}).get("baseline_pseudo_labels", {})}


def pseudo_label_inputs(wildcards):
    """The MAPs file for the MAPs labels; the baseline's confidence labels need the warmup only."""
    return {"prototypes": results("maps", "prototypes.h5")} if wildcards.labels == "maps" else {}


def pseudo_label_report_settings():
    return config.get("pseudo_label_report", {})


def pseudo_label_report_enabled():
    return bool(pseudo_label_report_settings().get("enabled", False))


def pseudo_label_strategies():
    """The strategies the pseudo-label report compares, in the config's order."""
    return list(pseudo_label_report_settings().get("strategies", {}))


def pseudo_label_report_inputs(wildcards):
    """The MAPs file when a compared strategy needs it (maps: GMMs, cas: class centroids)."""
    needed = {"maps", "cas"} & set(pseudo_label_strategies())
    return {"prototypes": results("maps", "prototypes.h5")} if needed else {}


def stm_settings():
    """The stm section (schema defaults filled in); a config without one has the STM disabled."""
    return config.get("stm", {})


def stm_enabled():
    return bool(stm_settings().get("enabled", False))


def stm_shards():
    """Shard indices of the source_distance_statistics and source_transferability jobs."""
    return list(range(int(stm_settings().get("shards", 1))))


def stm_weight_directories():
    """The folders of the STM weight PNGs, one per shard (bismap.transferability.weight_map_paths)."""
    return [results("stm", "weights", f"shard_{shard}") for shard in stm_shards()]


def stm_embedding_inputs(wildcards):
    """E-hat: the configured checkpoint, else the warmup checkpoint (its encoder is the stand-in)."""
    weights = stm_settings().get("embedding_checkpoint")
    return {"embedding_checkpoint": weights} if weights else {"warmup": results("checkpoints", "warmup.pt")}


def stm_network_settings():
    """EmbeddingNetworkSettings; the architecture only matters (and only reruns) with a checkpoint."""
    stm = stm_settings()
    network = {"normalization": stm["embedding_normalization"]}
    if stm.get("embedding_checkpoint"):
        network.update(depth=stm["embedding_depth"], width=stm["embedding_width"],
                       output_stride=stm["embedding_output_stride"])
    return network


def stm_target_embedding_settings():
    stm = stm_settings()
    return {"per_image": stm["embeddings_per_image"], "seed": stm["seed"], "batch_size": stm["batch_size"],
            "workers": stm["workers"]}


def stm_prototype_settings():
    stm = stm_settings()
    return {"clusters": stm["clusters"], "seed": stm["seed"], "iterations": stm["kmeans_iterations"],
            "use_gpu": stm["kmeans_gpu"]}


def stm_class_entropy_settings():
    return {"batch_size": stm_settings()["batch_size"], "workers": stm_settings()["workers"]}


def stm_transferability_settings():
    stm = stm_settings()
    return {key: stm[key] for key in ("distance_resolution", "chunk_rows", "histogram_bins", "workers")}


# Self-training variants (rules/selftrain.smk) and distillation (rules/distill.smk).


def selftrain_settings():
    """The selftrain section (schema defaults filled in); a config without one has it disabled."""
    return config.get("selftrain", {})


def selftrain_enabled():
    return bool(selftrain_settings().get("enabled", False))


def selftrain_variants():
    """{name: {maps, stm, consistency}} in the config's order; names must be unique."""
    variants = {}
    for variant in selftrain_settings().get("variants", []) if selftrain_enabled() else []:
        if variant["name"] in variants:
            raise WorkflowError(f"selftrain.variants: name '{variant['name']}' is used twice")
        variants[variant["name"]] = {key: value for key, value in variant.items() if key != "name"}
    return variants


def selftrain_variant(name):
    variants = selftrain_variants()
    if name not in variants:
        raise WorkflowError(f"no selftrain variant '{name}'; configured: {sorted(variants)}")
    return variants[name]


def variant_pseudo_labels(name):
    """Which pseudo-label set a variant learns from: 'maps' or 'baseline'."""
    return "maps" if selftrain_variant(name)["maps"] else "baseline"


def selftrain_run_settings(wildcards):
    """SelfTrainSettings of one variant: only what it uses, so editing lambda reruns consistency variants only."""
    variant = selftrain_variant(wildcards.variant)
    shared = ("training", "init", "sce_alpha", "sce_beta")
    settings = {key: selftrain_settings()[key] for key in shared if key in selftrain_settings()}
    if variant["consistency"]:
        for key in ("ema_decay", "consistency_weight", "strong_augment"):
            if key in selftrain_settings():
                settings[key] = selftrain_settings()[key]
    settings.update(use_stm=variant["stm"], use_consistency=variant["consistency"], use_pseudo_labels=True)
    return settings


def selftrain_inputs(wildcards):
    variant = selftrain_variant(wildcards.variant)
    labels = variant_pseudo_labels(wildcards.variant)
    inputs = {"pseudo_labels": expand(results("pseudo_labels", labels, "shard_{shard}"), shard=maps_shards())}
    if variant["stm"]:
        if not stm_enabled():
            raise WorkflowError(f"selftrain variant '{wildcards.variant}' uses the STM but stm.enabled is false")
        inputs["transferability"] = stm_weight_directories()
    if selftrain_settings().get("init") == "imagenet":
        inputs.update(pretrained_inputs(wildcards))
    return inputs


def baseline_pseudo_label_settings():
    return {**selftrain_settings().get("baseline_pseudo_labels", {})}


def distill_settings():
    return config.get("distill", {})


def distill_enabled():
    return bool(distill_settings().get("enabled", False))


def distill_teacher():
    """The self-training variant that teaches; checked against selftrain.variants."""
    name = distill_settings().get("teacher")
    if not selftrain_enabled():
        raise WorkflowError("distill.enabled needs selftrain.enabled: the teacher is a self-trained model")
    selftrain_variant(name)
    return name


def teacher_checkpoint():
    return results("checkpoints", f"selftrain_{distill_teacher()}.pt")


def teacher_label_settings():
    return {"strategy": "confidence", "confidence": distill_settings().get("teacher_confidence", 0.95),
            "flip_average": distill_settings().get("flip_average", True)}


def distill_inputs(wildcards):
    inputs = {}
    student_checkpoint = distill_settings().get("student_checkpoint")
    if student_checkpoint:
        inputs["student_checkpoint"] = student_checkpoint
    inputs.update(pretrained_inputs(wildcards))
    return inputs


def distill_run_settings():
    keys = ("training", "kl_weight", "student_init")
    return {key: distill_settings()[key] for key in keys if key in distill_settings()}


def final_outputs():
    outputs = [results("report", "summary.md")]
    if maps_enabled():
        outputs.append(results("pseudo_labels", "maps", "summary.json"))
    if pseudo_label_report_enabled():
        outputs.append(results("pseudo_label_report", "table.md"))
    if stm_enabled():
        outputs.append(results("stm", "summary.json"))
    # statistics (coverage, accuracy where target-train has labels) of the other pseudo-label sets
    if any(not variant["maps"] for variant in selftrain_variants().values()):
        outputs.append(results("pseudo_labels", "baseline", "summary.json"))
    if distill_enabled():
        outputs.append(results("pseudo_labels", "teacher", "summary.json"))
    return outputs


onsuccess:
    print(f"\nBiSMAP workflow finished. Results under {config['results']}/:")
    print(f"  summary table (BiSMAP Tables 1 and 4): {results('report', 'summary.md')}")
    print(f"  qualitative figure: {results('report', 'qualitative.png')}")
    for model in evaluated_models():
        print(f"  {model}: {results('evaluation', model, 'metrics.md')}")
    if maps_enabled():
        print(f"  MAPs pseudo-labels: {results('pseudo_labels', 'maps')}/shard_*/ (summary.json)")
    if pseudo_label_report_enabled():
        print(f"  pseudo-label quality (BiSMAP Table 5): {results('pseudo_label_report', 'table.md')}")
    if stm_enabled():
        print(f"  source transferability maps: {results('stm', 'weights')}/shard_*/ (summary.json, preview.png)")
