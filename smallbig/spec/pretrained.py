"""Which ImageNet files the workflow needs (`model.pretrained` of each experiment): the inputs of
the trainings and the downloads the workflow schedules. Pure: no download, no torch
(smallbig/models/weights.py fetches and verifies them)."""

from __future__ import annotations

from smallbig.config import ParamsError, classify


def required_files(params: dict) -> list[str]:
    """The files a training of `params` needs before it starts ([] for `none`): the declared
    `file` of a name, or the path itself (for the workflow's inputs)."""
    value = params["model"].get("pretrained")
    declared = params.get("pretrained_weights") or {}
    kind = classify(value, declared)
    if kind == "name":
        return [declared[value]["file"]]
    if kind == "path":
        return [value]
    return []


def workflow_files(params_by_exp: dict[str, dict]) -> dict[str, tuple[str, dict, str]]:
    """file -> (name, declaration, first experiment using it) for every declared file the given
    experiments load: the downloads the workflow schedules (one per file, shared) and `smallbig
    plan` counts. Raises PretrainedError when two experiments declare one file differently."""
    out: dict[str, tuple[str, dict, str]] = {}
    for exp in sorted(params_by_exp):
        p = params_by_exp[exp]
        value, declared = p["model"].get("pretrained"), p.get("pretrained_weights") or {}
        if classify(value, declared) != "name":
            continue
        entry = declared[value]
        seen = out.setdefault(entry["file"], (value, entry, exp))
        if (seen[0], seen[1]) != (value, entry):
            raise ParamsError(
                f"{exp}: pretrained_weights.{value}: {entry['file']} is declared differently "
                f"(as {seen[0]}: {seen[1]}) for {seen[2]}"
            )
    return out
