# Config validation, path helpers and the params every rule shares.

import os
import re
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

import bismap
from bismap.runtime import local_cuda_devices
from bismap.settings import (EXECUTION_KEYS, ExecutionSettings, merged, resolve_run_relative, split_execution,
                             with_run_seed)  # with_run_seed: run seed -> every stage's seeds (digit-scenes splits: stride 1000)

validate(config, schema="../config/schema.yaml")

DOMAINS = ["source", "target_train", "target_val"]
CODE_VERSION = bismap.CODE_VERSION
CONDA_ENV = "../envs/bismap.yaml"


def gpus_per_job():
    """What each GPU job asks for (`resources: gpu=`), per config `device`: 1, or 0 where jobs run on the CPU anyway.

    With gpu=1 on a CPU-only machine the default profile's gpu=1 cap would let one
    job run at a time, leaving the other cores idle; a job given gpu=0 runs on the CPU.
    """
    device = config.get("device", "auto")
    if device == "auto":
        return 1 if not workflow.local_exec or local_cuda_devices() > 0 else 0
    return 1 if device == "cuda" else 0


GPU_PER_JOB = gpus_per_job()


# Every per-run output lives under results/<name>/seed_{seed}/; only the report over
# the seeds (rule report_seeds) is outside. {seed} is a run seed of config `seeds`.
wildcard_constraints:
    seed=r"\d+",


def results(*parts):
    """A path under this configuration's results folder."""
    return os.path.join(config["results"], *parts)


def seeds():
    """The run seeds (config `seeds`, default [0]); each is a complete run under seed_<seed>/."""
    return [int(seed) for seed in config["seeds"]]


def run_path(*parts, seed="{seed}"):
    """A path under one run seed's folder; the default keeps {seed} a wildcard, input functions pass wildcards.seed."""
    return results(f"seed_{seed}", *parts)


def log_path(rule_name, *wildcards):
    return run_path("logs", rule_name, *wildcards) + ".log"


def benchmark_path(rule_name, *wildcards, seed="{seed}"):
    """seed_<seed>/benchmarks/<rule>[_<wildcards>].tsv: Snakemake's wall time (column s) etc. of one job."""
    return run_path("benchmarks", "_".join([rule_name, *wildcards]) + ".tsv", seed=seed)


def domain_settings(domain):
    return config["datasets"][domain]


def dataset_root(domain, seed):
    """Generated folder for the embedded benchmark (one per run seed), else the configured dataset root."""
    settings = domain_settings(domain)
    if settings["format"] == "digit_scenes":
        return run_path("data", "digit_scenes", domain, seed=seed)
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
        return [dataset_root(wildcards.domain, wildcards.seed)]
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
    statistics = run_path("gpa", "target_statistics.json", seed=wildcards.seed)
    return {"photometric_statistics": statistics} if gpa_enabled() else {}


def oracle_enabled():
    return bool(config.get("oracle", {}).get("enabled", False))


def evaluated_models():
    """The report's rows in pipeline order (selftrain_* and distill come from rules/selftrain.smk, distill.smk)."""
    models = ["warmup"]
    for name in selftrain_variants():
        models += [round_model(name, round_number) for round_number in range(1, variant_rounds(name))]
        models.append(f"selftrain_{name}")
    models += [distill_model(stage) for stage in distill_stage_numbers()]
    return models + (["oracle"] if oracle_enabled() else [])


def model_checkpoint(model, seed="{seed}"):
    """The checkpoint of a report row: checkpoints/<model>.pt, or checkpoints/rounds/ for an earlier round."""
    earlier_stages = {distill_model(stage) for stage in distill_stage_numbers()[:-1]}
    if model in {round_model(name, round_number) for name, round_number in earlier_rounds()} | earlier_stages:
        return run_path("checkpoints", "rounds", f"{model}.pt", seed=seed)
    return run_path("checkpoints", f"{model}.pt", seed=seed)


def model_components():
    """Per report row, the components it uses (BiSMAP Table 4 columns)."""
    components = {}
    for name, variant in bismap_variants().items():
        used = {"maps": variant["maps"], "stm": variant["stm"], "consistency": variant["consistency"],
                "alignment": variant["alignment"], "distillation": False}
        for round_number in range(1, variant_rounds(name)):
            components[round_model(name, round_number)] = {**used, "rounds": round_number}
        components[f"selftrain_{name}"] = {**used, "rounds": variant_rounds(name)}
    for stage in distill_stage_numbers():  # "distillation" counts the stages, as "rounds" the self-training rounds
        components[distill_model(stage)] = {**components[f"selftrain_{distill_teacher()}"], "distillation": stage}
    return components


def control_rows():
    """The report's controls (variants with compare_with): model -> {reference, changes} (bismap.report.seeds)."""
    rows = {}
    for name, variant in selftrain_variants().items():
        if variant["compare_with"]:
            changes = [f"STM form {variant['stm_form']}"] * (variant["stm_form"] != "eq9")
            changes += [f"labels {variant['labels']}"] * bool(variant["labels"])
            changes += [f"settings {variant['overrides']}"] * bool(variant["overrides"])
            rows[f"selftrain_{name}"] = {"reference": f"selftrain_{variant['compare_with']}",
                                         "changes": ", ".join(changes) or "-"}
    return rows


def full_bismap_variant():
    """The variant that is BiSMAP itself: the distillation teacher, else the last with MAPs, STM and consistency."""
    if distill_enabled():
        return distill_teacher()
    full = [name for name, variant in bismap_variants().items()
            if variant["maps"] and variant["stm"] and variant["consistency"] and not variant["compare_with"]]
    return full[-1] if full else None


def method_rows():
    """The family table's rows (bismap.report.methods): report row -> method, in the report's order."""
    methods = {"warmup": "source"}
    for name, variant in selftrain_variants().items():
        if variant["method"] == "cag":  # one row per stage, each with its paper number (CAG-UDA Table 4)
            stages = variant_rounds(name)
            for stage in range(1, stages + 1):
                model = f"selftrain_{name}" if stage == stages else round_model(name, stage)
                methods[model] = "cag" if stage == 1 else f"cag_stage_{stage}"
        elif variant["method"] != "bismap" and not variant["compare_with"]:  # a control is a row of its own table
            methods[f"selftrain_{name}"] = variant["method"]
    full = full_bismap_variant()
    if full:
        methods[f"selftrain_{full}"] = "bismap"
    if distill_enabled():
        methods["distill"] = "bismap_distill"
    if oracle_enabled():
        methods["oracle"] = "oracle"
    return methods


def maps_settings():
    """The maps section (schema defaults filled in); a config without one has MAPs disabled."""
    return config.get("maps", {})


def maps_enabled():
    return bool(maps_settings().get("enabled", False))


def class_ids():
    """Train ids 0..C-1."""
    return list(range(len(config["classes"])))


def gmm_job_classes():
    """The class ids each fit_class_gmm job fits: round-robin over maps.gmm_jobs jobs; null = one class per job."""
    count = min(maps_settings().get("gmm_jobs") or len(class_ids()), len(class_ids()))
    return [class_ids()[job::count] for job in range(count)]


def maps_shards():
    """Shard indices of the pseudo_labels jobs."""
    return list(range(int(maps_settings().get("shards", 1))))


def maps_pseudo_label_settings():
    """PseudoLabelSettings of the MAPs labels."""
    return {**maps_settings().get("pseudo_labels", {}), "strategy": "maps"}


def pseudo_label_settings(labels):
    """PseudoLabelSettings of one pseudo-label set: 'maps', 'baseline' (selftrain.baseline_pseudo_labels) or
    'cas' (CAG-UDA's anchor labels, margin selftrain.cag.margin)."""
    if labels == "maps":
        return maps_pseudo_label_settings()
    if labels == "cas":
        return {"strategy": "cas", "margin": config.get("selftrain", {}).get("cag", {}).get("margin", 2.5)}
    if labels in COVERAGE_MATCHED_LABELS:  # scored as the MAPs labels are, thresholded to their PL ratio
        resolution = maps_pseudo_label_settings().get("resolution", "feature")
        strategy = labels.removesuffix("_matched")
        return {"strategy": strategy, "match_coverage": True, "resolution": resolution}
    return {**config.get("selftrain", {}).get("baseline_pseudo_labels", {})}


def pseudo_label_inputs(wildcards):
    """The MAPs file for the MAPs and anchor labels; the confidence labels need the warmup only; the coverage
    controls the MAPs labels' PL ratio."""
    inputs = {}
    if wildcards.labels in ("maps", "cas", "cas_matched"):
        inputs["prototypes"] = run_path("maps", "prototypes.h5", seed=wildcards.seed)
    if wildcards.labels in COVERAGE_MATCHED_LABELS:
        inputs["coverage_reference"] = run_path("pseudo_labels", "maps", "summary.json", seed=wildcards.seed)
    return inputs


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
    return {"prototypes": run_path("maps", "prototypes.h5", seed=wildcards.seed)} if needed else {}


def stm_settings():
    """The stm section (schema defaults filled in); a config without one has the STM disabled."""
    return config.get("stm", {})


def stm_enabled():
    return bool(stm_settings().get("enabled", False))


def stm_shards():
    """Shard indices of the source_distance_statistics and source_transferability jobs."""
    return list(range(int(stm_settings().get("shards", 1))))


def stm_weight_directories(seed="{seed}", form="eq9"):
    """The folders of the STM weight PNGs, one per shard (bismap.stm.source.weight_map_paths); a control form's
    under stm/controls/<form>/."""
    if form == "eq9":
        return [run_path("stm", "weights", f"shard_{shard}", seed=seed) for shard in stm_shards()]
    return [run_path("stm", "controls", form, f"shard_{shard}", seed=seed) for shard in stm_shards()]


def stm_embedding_inputs(wildcards):
    """E-hat: the configured checkpoint, else the warmup checkpoint (its encoder is the stand-in)."""
    weights = stm_settings().get("embedding_checkpoint")
    return {"embedding_checkpoint": weights} if weights else {
        "warmup": run_path("checkpoints", "warmup.pt", seed=wildcards.seed)}


def stm_network_settings():
    """EmbeddingNetworkSettings; the architecture only matters (and only reruns) with a checkpoint."""
    stm = stm_settings()
    network = {"normalization": stm["embedding_normalization"]}
    if stm.get("embedding_checkpoint"):
        network.update(depth=stm["embedding_depth"], width=stm["embedding_width"],
                       output_stride=stm["embedding_output_stride"])
    return network


def stm_target_embedding_settings(wildcards):
    stm = stm_settings()
    settings = {"per_image": stm["embeddings_per_image"], "seed": stm["seed"], "batch_size": stm["batch_size"],
                "workers": stm["workers"]}
    return with_run_seed(settings, wildcards.seed)


def stm_prototype_settings(wildcards):
    stm = stm_settings()
    settings = {"clusters": stm["clusters"], "seed": stm["seed"], "iterations": stm["kmeans_iterations"],
                "use_gpu": stm["kmeans_gpu"]}
    return with_run_seed(settings, wildcards.seed)


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


# The selftrain keys each family method reads (its *TrainSettings dataclass).
METHOD_SETTINGS = {"proda": ("training", "proda", "strong_augment"), "cpsl": ("training", "cpsl", "strong_augment"),
                   "contrastive": ("training", "contrastive", "baseline_pseudo_labels"), "cag": ("training", "cag")}
VARIANT_DEFAULTS = {"method": "bismap", "maps": False, "stm": False, "consistency": False, "alignment": False,
                    "rounds": 1, "stm_form": "eq9", "labels": None, "overrides": {}, "compare_with": None}
# Controls of BiSMAP's components (issue: each component isolated): the STM map's form, and the label sets
# of equal coverage to the MAPs labels (bismap.labels.coverage).
STM_FORMS = ("eq9", "distance_only", "entropy_only", "class_mean")
COVERAGE_MATCHED_LABELS = ("confidence_matched", "cas_matched")


def selftrain_variants():
    """{name: {method, maps, stm, consistency, rounds}} in the config's order; names must be unique."""
    variants = {}
    for variant in selftrain_settings().get("variants", []) if selftrain_enabled() else []:
        if variant["name"] in variants:
            raise WorkflowError(f"selftrain.variants: name '{variant['name']}' is used twice")
        settings = {**VARIANT_DEFAULTS, **{key: value for key, value in variant.items() if key != "name"}}
        if settings["method"] != "bismap" and (settings["maps"] or settings["stm"] or settings["consistency"]
                                               or settings["alignment"]
                                               or (settings["rounds"] != 1 and settings["method"] != "cag")):
            raise WorkflowError(f"selftrain variant '{variant['name']}' (method {settings['method']}): maps, stm, "
                                "consistency, alignment and rounds belong to method bismap (rounds also to cag: "
                                "its stages)")
        if settings["method"] != "bismap" and (settings["stm_form"] != "eq9" or settings["labels"]):
            raise WorkflowError(f"selftrain variant '{variant['name']}' (method {settings['method']}): stm_form "
                                "and labels belong to method bismap")
        if settings["labels"] and settings["maps"]:
            raise WorkflowError(f"selftrain variant '{variant['name']}': labels '{settings['labels']}' replace the "
                                "MAPs labels; set maps: false")
        if settings["alignment"] and not settings["consistency"]:
            raise WorkflowError(f"selftrain variant '{variant['name']}': alignment acts on the consistency "
                                "teacher's targets; set consistency: true")
        variants[variant["name"]] = settings
    for name, settings in variants.items():
        if settings["compare_with"] is not None and settings["compare_with"] not in variants:
            raise WorkflowError(f"selftrain variant '{name}': compare_with '{settings['compare_with']}' is not a "
                                f"variant; configured: {sorted(variants)}")
    return variants


def variant_name_pattern():
    """The {variant} wildcard matches a configured variant name only: a looser pattern would let rule
    selftrain's files (benchmarks/selftrain_{variant}.tsv) match a round's (selftrain_round_bismap_round_1.tsv)."""
    names = sorted(selftrain_variants(), key=len, reverse=True)
    return "|".join(re.escape(name) for name in names) if names else "(?!)"


def bismap_variants():
    """The variants of method bismap: they learn from MAPs or baseline pseudo-label files."""
    return {name: variant for name, variant in selftrain_variants().items() if variant["method"] == "bismap"}


def selftrain_variant(name):
    variants = selftrain_variants()
    if name not in variants:
        raise WorkflowError(f"no selftrain variant '{name}'; configured: {sorted(variants)}")
    return variants[name]


def variant_pseudo_labels(name):
    """Which pseudo-label set a variant learns from: 'maps', 'baseline' (also the contrastive static labels) or
    a set of equal coverage to the MAPs labels (its ``labels``)."""
    variant = selftrain_variant(name)
    return variant["labels"] or ("maps" if variant["maps"] else "baseline")


def selftrain_run_settings(wildcards):
    """SelfTrainSettings of one variant: only what it uses, so editing lambda reruns consistency variants only."""
    variant = selftrain_variant(wildcards.variant)
    settings = variant_method_settings(wildcards, variant)
    settings = merged(settings, variant["overrides"], f"selftrain variant '{wildcards.variant}' overrides")
    return with_run_seed(resolve_run_relative(settings, settings["training"]["iterations"],
                                              f"selftrain variant '{wildcards.variant}'"), wildcards.seed)


def variant_method_settings(wildcards, variant):
    """The selftrain keys a variant's method reads, before its overrides."""
    if variant["method"] != "bismap":  # ProdaTrainSettings, CpslTrainSettings, ...
        keys = METHOD_SETTINGS[variant["method"]]
        return {key: selftrain_settings()[key] for key in keys if key in selftrain_settings()}
    shared = ("training", "init", "sce_alpha", "sce_beta")
    settings = {key: selftrain_settings()[key] for key in shared if key in selftrain_settings()}
    if variant["consistency"]:
        for key in ("ema_decay", "consistency_weight", "consistency_rampup", "teacher_batch_statistics",
                    "strong_augment"):
            if key in selftrain_settings():
                settings[key] = selftrain_settings()[key]
    if variant["alignment"]:  # only then: variants without it keep their params (no rerun)
        settings.update(align_teacher=True, balance_pseudo_labels=True)
        for key in ("alignment_momentum", "alignment_weight_cap"):
            if key in selftrain_settings():
                settings[key] = selftrain_settings()[key]
    settings.update(use_stm=variant["stm"], use_consistency=variant["consistency"], use_pseudo_labels=True)
    if round_number_of(wildcards) > 1:  # 'warmup': start from the input checkpoint, here the previous round's
        settings["init"] = "warmup"
    return settings


def variant_rounds(name):
    """Self-training rounds of one variant (its `rounds`, default 1)."""
    return int(selftrain_variant(name)["rounds"])


def round_number_of(wildcards):
    """Which round a selftrain job trains: its {round} wildcard, or the variant's last round (rule selftrain)."""
    return int(wildcards.get("round", variant_rounds(wildcards.variant)))


def round_model(variant, round_number):
    """Report/checkpoint name of a round before the variant's last (checkpoints/rounds/<name>.pt)."""
    return f"selftrain_{variant}_round_{round_number}"


def earlier_rounds(method=None):
    """(variant, round) of every round before a variant's last, in the config's order; only ``method``'s if given."""
    return [(name, round_number) for name, variant in selftrain_variants().items()
            for round_number in range(1, variant_rounds(name)) if method in (None, variant["method"])]


def round_label_settings():
    """PseudoLabelSettings of the labels between rounds: the previous round's confident predictions."""
    labels = selftrain_settings().get("round_labels", {})
    return {"strategy": "confidence", "confidence": labels.get("confidence", 0.95),
            "flip_average": labels.get("flip_average", False), "resolution": labels.get("resolution", "feature")}


def label_shard_folders(*label_set, seed):
    """The shard folders of one pseudo-label set under pseudo_labels/ (e.g. 'maps', or 'rounds', '<v>_round_1')."""
    return expand(run_path("pseudo_labels", *label_set, "shard_{shard}", seed=seed), shard=maps_shards())


def selftrain_initial_inputs(wildcards):
    """Round 1 starts from the warmup and the variant's labels; round r from round r-1 and its labels."""
    round_number = round_number_of(wildcards)
    if round_number > variant_rounds(wildcards.variant):
        raise WorkflowError(f"selftrain round {round_number} of variant '{wildcards.variant}', which has "
                            f"{variant_rounds(wildcards.variant)} round(s)")
    method = selftrain_variant(wildcards.variant)["method"]
    if round_number > 1:
        previous_round = f"{wildcards.variant}_round_{round_number - 1}"
        previous = run_path("checkpoints", "rounds", f"selftrain_{previous_round}.pt", seed=wildcards.seed)
        if method == "cag":  # CAG-UDA's next stage: anchors and anchor labels of the previous stage's model
            return {"initial": previous, "prototypes": run_path("maps", "rounds", previous_round, "prototypes.h5",
                                                                seed=wildcards.seed),
                    "pseudo_labels": label_shard_folders("cag_rounds", previous_round, seed=wildcards.seed)}
        labels = label_shard_folders("rounds", previous_round, seed=wildcards.seed)
        return {"initial": previous, "pseudo_labels": labels}
    warmup = run_path("checkpoints", "warmup.pt", seed=wildcards.seed)
    if method in ("proda", "cpsl"):  # make their labels while they train
        return {"initial": warmup}
    if method == "cag":  # the anchor labels, and the anchors (the MAPs file's class centroids)
        labels = label_shard_folders(*cag_label_set(wildcards.variant), seed=wildcards.seed)
        return {"initial": warmup, "pseudo_labels": labels,
                "prototypes": run_path("maps", "prototypes.h5", seed=wildcards.seed)}
    labels = label_shard_folders(variant_pseudo_labels(wildcards.variant), seed=wildcards.seed)
    return {"initial": warmup, "pseudo_labels": labels}


def selftrain_inputs(wildcards):
    variant = selftrain_variant(wildcards.variant)
    inputs = selftrain_initial_inputs(wildcards)
    if variant["stm"]:
        if not stm_enabled():
            raise WorkflowError(f"selftrain variant '{wildcards.variant}' uses the STM but stm.enabled is false")
        inputs["transferability"] = stm_weight_directories(wildcards.seed, variant["stm_form"])
    if selftrain_settings().get("init") == "imagenet" and round_number_of(wildcards) == 1:
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


def distill_stages():
    """Distillation stages (distill.stages): each stage's student teaches the next (the public BiSMAP code runs 2)."""
    return int(distill_settings().get("stages", 1))


def distill_stage_numbers():
    """1, ..., distill.stages when distillation is on, else none."""
    return range(1, distill_stages() + 1) if distill_enabled() else range(0)


def distill_model(stage):
    """Report/checkpoint name of distillation stage ``stage``: 'distill' for the last, 'distill_stage_<s>' before it."""
    return "distill" if stage == distill_stages() else f"distill_stage_{stage}"


def distill_stage_of(wildcards):
    """Which stage a distillation job trains: its {stage} wildcard, or the last stage (rule distill)."""
    stage = int(wildcards.get("stage", distill_stages()))
    if not 1 <= stage <= distill_stages():
        raise WorkflowError(f"distillation stage {stage}: distill.stages is {distill_stages()}")
    return stage


def teacher_label_set(stage):
    """The pseudo_labels/ folder of the labels stage ``stage`` learns from: 'teacher', then 'teacher_stage_<s>'."""
    return "teacher" if stage == 1 else f"teacher_stage_{stage}"


def teacher_checkpoint(stage=1, seed="{seed}"):
    """Stage 1 learns from the self-trained teacher variant, stage s from stage s - 1's student."""
    if stage == 1:
        return run_path("checkpoints", f"selftrain_{distill_teacher()}.pt", seed=seed)
    return model_checkpoint(distill_model(stage - 1), seed)


def distill_teacher_inputs(wildcards):
    """The teacher checkpoint and its label shards of one distillation stage."""
    stage = distill_stage_of(wildcards)
    return {"teacher": teacher_checkpoint(stage, wildcards.seed),
            "teacher_labels": label_shard_folders(teacher_label_set(stage), seed=wildcards.seed)}


def teacher_label_settings():
    """PseudoLabelSettings of the teacher's labels; teacher_scales and teacher_resolution enter the params only
    when the config sets them, so runs made before they existed keep their params."""
    settings = {"strategy": "confidence", "confidence": distill_settings().get("teacher_confidence", 0.95),
                "flip_average": distill_settings().get("flip_average", True)}
    optional = {"teacher_scales": "scales", "teacher_resolution": "resolution"}
    settings.update({name: distill_settings()[key] for key, name in optional.items() if key in distill_settings()})
    return settings


def distill_inputs(wildcards):
    inputs = {}
    student_checkpoint = distill_settings().get("student_checkpoint")
    if student_checkpoint:
        inputs["student_checkpoint"] = student_checkpoint
    inputs.update(pretrained_inputs(wildcards))
    return inputs


def distill_run_settings(wildcards):
    keys = ("training", "kl_weight", "student_init")
    return with_run_seed({key: distill_settings()[key] for key in keys if key in distill_settings()}, wildcards.seed)


def maps_labels_needed():
    """The MAPs pseudo-label shards are in the DAG: maps.enabled, or a variant learns from them."""
    return maps_enabled() or any(variant["maps"] for variant in bismap_variants().values()) \
        or bool(coverage_matched_label_sets())


def coverage_matched_label_sets():
    """The label sets of equal coverage to the MAPs labels that some variant learns from."""
    return [labels for labels in COVERAGE_MATCHED_LABELS
            if any(variant["labels"] == labels for variant in selftrain_variants().values())]


def maps_summary_needed():
    """pseudo_labels/maps/summary.json: maps.enabled, or the coverage the matched label sets take."""
    return maps_enabled() or bool(coverage_matched_label_sets())


def stm_control_forms():
    """The controls of the STM map some variant with stm trains on (stm/controls/<form>/)."""
    return [form for form in STM_FORMS[1:]
            if any(variant["stm"] and variant["stm_form"] == form for variant in selftrain_variants().values())]


def cag_margin(name):
    """Delta_d of a cag variant's anchor labels: selftrain.cag.margin, or its overrides' (a tuning trial)."""
    return selftrain_variant(name)["overrides"].get("cag", {}).get("margin", pseudo_label_settings("cas")["margin"])


def cag_label_set(name):
    """The anchor labels of a cag variant's first stage: the shared 'cas' set, or its own for its own margin."""
    return ("cas",) if cag_margin(name) == pseudo_label_settings("cas")["margin"] else ("cas_variants", name)


def cas_labels_needed():
    """CAG-UDA's shared anchor labels are in the DAG: a variant of method cag learns from them."""
    return any(variant["method"] == "cag" and cag_label_set(name) == ("cas",)
               for name, variant in selftrain_variants().items())


def baseline_labels_needed():
    return any(not variant["maps"] for variant in bismap_variants().values()) \
        or any(variant["method"] == "contrastive" for variant in selftrain_variants().values())


def prototypes_needed():
    """The MAPs file (features, GMM fits, merge) is in the DAG: for the MAPs labels or the report's maps/cas."""
    report_needs = pseudo_label_report_enabled() and bool({"maps", "cas"} & set(pseudo_label_strategies()))
    cag = any(variant["method"] == "cag" for variant in selftrain_variants().values())  # the anchors
    return maps_labels_needed() or cag or report_needs


def stage_jobs():
    """Per rule, the wildcard part of the benchmark name of each job in one seed's DAG.

    It restates which jobs final_outputs brings in: report_seeds takes these benchmark
    files as inputs, so a job listed here that nothing else asks for would be run, and
    one left out would be missing from the time table (the workflow tests compare it
    with dry-run plans).
    """
    shards = [f"shard_{shard}" for shard in maps_shards()]
    stm_shard_names = [f"shard_{shard}" for shard in stm_shards()]
    labels = ["maps"] * maps_labels_needed() + ["baseline"] * baseline_labels_needed() + ["cas"] * cas_labels_needed()
    labels += coverage_matched_label_sets()
    jobs = {"make_digit_scenes": [domain for domain in DOMAINS if domain_settings(domain)["format"] == "digit_scenes"],
            "index_dataset": DOMAINS, "gpa_statistics": [""] * gpa_enabled(), "warmup": [""],
            "oracle": [""] * oracle_enabled()}
    if prototypes_needed():
        jobs.update(extract_source_features=[""], merge_class_gmms=[""],
                    fit_class_gmm=[f"job_{job}" for job in range(len(gmm_job_classes()))])
    jobs["pseudo_labels"] = [f"{name}_{shard}" for name in labels for shard in shards]
    teacher_sets = [teacher_label_set(stage) for stage in distill_stage_numbers()]
    jobs["merge_pseudo_labels"] = ["maps"] * maps_summary_needed() + ["baseline"] * baseline_labels_needed() + \
        teacher_sets
    own_anchor_labels = [name for name, variant in selftrain_variants().items()
                         if variant["method"] == "cag" and cag_label_set(name) != ("cas",)]
    jobs["variant_anchor_labels"] = [f"{name}_{shard}" for name in own_anchor_labels for shard in shards]
    jobs["pseudo_label_report"] = [""] * pseudo_label_report_enabled()
    if stm_enabled():
        jobs.update(extract_target_embeddings=[""], target_prototypes=[""], class_entropy=[""],
                    source_distance_statistics=stm_shard_names, source_transferability=stm_shard_names,
                    merge_source_transferability=[""],
                    stm_control_weights=[f"{form}_{shard}" for form in stm_control_forms() for shard in stm_shard_names])
    jobs["selftrain"] = list(selftrain_variants())
    jobs["selftrain_round"] = [f"{variant}_round_{round_number}" for variant, round_number in earlier_rounds()]
    rounds = [f"{variant}_round_{round_number}" for variant, round_number in earlier_rounds("bismap")]
    jobs["round_pseudo_labels"] = [f"{name}_{shard}" for name in rounds for shard in shards]
    stages = [f"{variant}_round_{round_number}" for variant, round_number in earlier_rounds("cag")]
    jobs.update(stage_source_features=stages, stage_merge_class_gmms=stages,
                stage_fit_class_gmm=[f"{name}_job_{job}" for name in stages for job in range(len(gmm_job_classes()))],
                stage_anchor_labels=[f"{name}_{shard}" for name in stages for shard in shards])
    if distill_enabled():
        numbers = distill_stage_numbers()
        jobs.update(teacher_pseudo_labels=shards, distill=[""],
                    stage_teacher_pseudo_labels=[f"{stage}_{shard}" for stage in numbers[1:] for shard in shards],
                    distill_stage=[str(stage) for stage in numbers[:-1]])
    jobs.update(evaluate=evaluated_models(), qualitative_figure=[""], report=[""])
    return {rule: names for rule, names in jobs.items() if names}


def stage_benchmarks(seed):
    """{rule: [benchmark file of each job]} of one run seed, for the time-per-stage table of report_seeds."""
    return {rule: [benchmark_path(rule, *([name] if name else []), seed=seed) for name in names]
            for rule, names in stage_jobs().items()}


def seed_benchmarks():
    """{seed: stage_benchmarks(seed)} over the run seeds (params of report_seeds)."""
    return {seed: stage_benchmarks(seed) for seed in seeds()}


def seed_outputs(seed):
    """What each run seed adds to the default target besides its report (an input of report_seeds)."""
    outputs = []
    if maps_enabled():
        outputs.append(run_path("pseudo_labels", "maps", "summary.json", seed=seed))
    if pseudo_label_report_enabled():
        outputs.append(run_path("pseudo_label_report", "table.md", seed=seed))
    if stm_enabled():
        outputs.append(run_path("stm", "summary.json", seed=seed))
    # statistics (coverage, accuracy where target-train has labels) of the other pseudo-label sets
    if baseline_labels_needed():
        outputs.append(run_path("pseudo_labels", "baseline", "summary.json", seed=seed))
    outputs += [run_path("pseudo_labels", teacher_label_set(stage), "summary.json", seed=seed)
                for stage in distill_stage_numbers()]
    return outputs


def predict_outputs(seed):
    """predict/<model>/ of each predict.models row when predict.input names a folder of images."""
    settings = config.get("predict", {})
    if not settings.get("input"):
        return []
    unknown = [model for model in settings.get("models", []) if model not in evaluated_models()]
    if unknown:
        raise WorkflowError(f"predict.models: {unknown} are not report rows; known: {evaluated_models()}")
    return [run_path("predict", model, seed=seed) for model in settings.get("models", [])]


def final_outputs():
    return [results("report", "summary.md")] + [path for seed in seeds() for path in seed_outputs(seed)] + \
        [path for seed in seeds() for path in predict_outputs(seed)]


onsuccess:
    each = lambda *parts: run_path(*parts, seed="<seed>")
    print(f"\nBiSMAP workflow finished. Results under {config['results']}/, one folder per run seed {seeds()}:")
    print(f"  mean ± std over the seeds and time per stage: {results('report', 'summary.md')}")
    print(f"  summary table of one seed (BiSMAP Tables 1 and 4): {each('report', 'summary.md')}")
    print(f"  qualitative figure: {each('report', 'qualitative.png')}")
    for model in evaluated_models():
        print(f"  {model}: {each('evaluation', model, 'metrics.md')}")
    if maps_enabled():
        print(f"  MAPs pseudo-labels: {each('pseudo_labels', 'maps')}/shard_*/ (summary.json)")
    if pseudo_label_report_enabled():
        print(f"  pseudo-label quality (BiSMAP Table 5): {each('pseudo_label_report', 'table.md')}")
    if stm_enabled():
        print(f"  source transferability maps: {each('stm', 'weights')}/shard_*/ (summary.json, preview.png)")
    print(f"  Snakemake benchmarks (wall time, memory) of every job: {each('benchmarks')}/")


# The {variant} wildcard of the self-training rules: the configured names only (variant_name_pattern).
VARIANT_NAMES = variant_name_pattern()


# Execution settings (bismap.settings.ExecutionSettings): a rule's settings param leaves them out, its
# execution param carries them, so editing one reruns nothing and keeps resume progress.
def result_part(settings, keys=EXECUTION_KEYS):
    """The settings (a dict, or a function of the wildcards) without their execution keys: the rerun trigger."""
    if callable(settings):
        return lambda wildcards: split_execution(settings(wildcards), keys)[0]
    return split_execution(settings, keys)[0]


def execution_part(settings, keys=EXECUTION_KEYS):
    """The execution keys of the settings, as an ExecutionSettings param (not compared by Snakemake)."""
    if callable(settings):
        return lambda wildcards: ExecutionSettings(split_execution(settings(wildcards), keys)[1])
    return ExecutionSettings(split_execution(settings, keys)[1])


EVALUATE_EXECUTION_KEYS = EXECUTION_KEYS + ("batch_size",)  # inference: the same metrics at any batch size


def warmup_training(wildcards):
    return with_run_seed(config["warmup"], wildcards.seed)


def oracle_training(wildcards):
    return with_run_seed(config.get("oracle", {}).get("training", config["warmup"]), wildcards.seed)
