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
    return ["warmup", "oracle"] if oracle_enabled() else ["warmup"]


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
    """PseudoLabelSettings of the MAPs labels (rules/maps.smk writes strategy 'maps' only)."""
    return {**maps_settings().get("pseudo_labels", {}), "strategy": "maps"}


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


def final_outputs():
    outputs = [results("report", "summary.md")]
    if maps_enabled():
        outputs.append(results("pseudo_labels", "maps", "summary.json"))
    if pseudo_label_report_enabled():
        outputs.append(results("pseudo_label_report", "table.md"))
    return outputs


onsuccess:
    print(f"\nBiSMAP workflow finished. Results under {config['results']}/:")
    print(f"  summary table: {results('report', 'summary.md')}")
    for model in evaluated_models():
        print(f"  {model}: {results('evaluation', model, 'metrics.md')}")
    if maps_enabled():
        print(f"  MAPs pseudo-labels: {results('pseudo_labels', 'maps')}/shard_*/ (summary.json)")
    if pseudo_label_report_enabled():
        print(f"  pseudo-label quality (BiSMAP Table 5): {results('pseudo_label_report', 'table.md')}")
