"""Evaluation: predictions per language, the paper's metrics, a table on screen and JSON on disk.

Inference is translate-test style: each target-language input runs with its English translation as
the source stream, fused as in training (``use_source=False`` evaluates plain LoRA).

* decoder classification: one forward over the prompts; the next-token logits at the last prompt
  position, restricted to the label words' first tokens, give the class.
* decoder QA: greedy generation (``FlareModel.generate``, the source stream decoding its own English
  continuation in lockstep), up to ``task.max_answer_tokens``, cut at EOS and at the first newline.
* decoders with ``scoring="authors"`` (their scripts' way, to reproduce their numbers): greedy
  generation of up to 100 new tokens for every task, cut at the first EOS, decoded without special
  tokens, surrounding whitespace stripped (``str.strip``), nothing else. Classification: that string
  must equal a label word exactly (case included), anything else (an empty or unparseable output)
  counts as wrong; QA: that string is the answer, scored by the same exact match / F1 (SQuAD
  normalization) as ours. The table's title names the scoring, so the two can be told apart.
* encoder classification: argmax of the head; encoder QA: the best start/end span in the context.

Metrics (flare.metrics, percent): XNLI accuracy; NusaX macro-F1 and accuracy; TyDiQA-GoldP exact
match and F1. ``average`` is the unweighted mean over languages, as the paper averages.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from .metrics import classification_scores, qa_scores
from .tasks import Task, best_span, label_token_ids
from .train.batching import collate, prepare
from .train.objective import model_inputs, supports_logits_to_keep

logger = logging.getLogger(__name__)

SCORINGS = ("ours", "authors")
AUTHORS_MAX_NEW_TOKENS = 100  # the authors' generation budget


def scoring_name(task: Task, family: str, scoring: str) -> str | None:
    """What a decoder table's numbers come from (None for encoders: one way only)."""
    if family != "decoder":
        return None
    if scoring == "authors":
        return f"authors: greedy generation of up to {AUTHORS_MAX_NEW_TOKENS} tokens, exact string match"
    if task.kind == "classification":
        return "ours: next-token logits over the label words"
    return f"ours: greedy generation of up to {task.max_answer_tokens} tokens, first line"


class EvaluationStopped(Exception):
    """``should_stop`` turned true between two batches (Ctrl-C during an evaluation that need not finish)."""


@torch.no_grad()
def predict(
    model,
    task: Task,
    tokenizer,
    family: str,
    rows: Sequence[dict],
    *,
    max_length: int,
    batch_size: int,
    use_source: bool,
    device: torch.device,
    autocast=None,
    progress: bool = False,
    desc: str = "predict",
    should_stop=None,
    alignment: str = "ours",
    scoring: str = "ours",
) -> list:
    """Class indices (classification; -1: an output matching no label word, authors' scoring) or answer
    strings (QA), one per row. ``should_stop``: a callable checked before each batch; when true, raises
    ``EvaluationStopped``. alignment / scoring: "ours" | "authors" for decoders (module docstring)."""
    from tqdm.auto import tqdm

    if scoring not in SCORINGS:
        raise ValueError(f"decoder_eval must be one of {SCORINGS}, got {scoring!r}")
    from .train.mt import featurizer_for

    # A FLARE MT model reads its NLLB source of the target text (no English), whatever use_source says.
    mt = featurizer_for(model, task, tokenizer, family, max_length)
    examples = prepare(
        rows, task, tokenizer, family, max_length, with_source=use_source and mt is None, with_answer=False,
        alignment=alignment, mt=mt,
    )  # fmt: skip
    pad = tokenizer.pad_token_id
    keep = family == "decoder" and supports_logits_to_keep(model)
    label_ids = (
        torch.tensor(label_token_ids(task, tokenizer))
        if family == "decoder" and task.kind == "classification"
        else None
    )
    was_training = model.training
    model.eval()
    preds: list = []
    try:
        for start in tqdm(
            range(0, len(examples), batch_size), desc=desc, unit="batch", leave=False, disable=not progress
        ):
            if should_stop is not None and should_stop():
                raise EvaluationStopped(desc)
            chunk = examples[start : start + batch_size]
            batch = collate(chunk, family, task, pad, with_answer=False)
            inputs = model_inputs(batch, device, use_source)
            with autocast() if autocast else _null():
                if family == "decoder" and scoring == "authors":
                    texts = _generate(model, tokenizer, inputs, AUTHORS_MAX_NEW_TOKENS, first_line=False)
                    preds += texts if task.kind == "qa" else [parse_label(task, t) for t in texts]
                    continue
                if family == "decoder" and task.kind == "qa":
                    preds += _generate(model, tokenizer, inputs, task.max_answer_tokens)
                    continue
                if family == "decoder":
                    if keep:
                        inputs["logits_to_keep"] = 1
                    logits = model(**inputs).logits[:, -1, :].float()
                    preds += logits[:, label_ids.to(logits.device)].argmax(-1).tolist()
                    continue
                out = model(**inputs)
            if task.kind == "classification":
                preds += out.logits.float().argmax(-1).tolist()
            else:
                for i, ex in enumerate(chunk):
                    row = rows[start + i]
                    s, e = out.start_logits[i].float().tolist(), out.end_logits[i].float().tolist()
                    preds.append(best_span(s, e, ex.target.offsets, row["context"]))
    finally:
        model.train(was_training)
    return preds


def _null():
    import contextlib

    return contextlib.nullcontext()


def parse_label(task: Task, text: str) -> int:
    """The class whose label word ``text`` is exactly (after ``str.strip``), else -1 (scored as wrong)."""
    text = text.strip()
    return task.label_words.index(text) if text in task.label_words else -1


def _generate(model, tokenizer, inputs: dict, max_new_tokens: int, *, first_line: bool = True) -> list[str]:
    eos = tokenizer.eos_token_id
    out = model.generate(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        source_input_ids=inputs.get("source_input_ids"),
        source_attention_mask=inputs.get("source_attention_mask"),
        **{k: inputs[k] for k in ("mt_input_ids", "mt_attention_mask", "mt_alignment") if k in inputs},
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    sequences = getattr(out, "sequences", out)
    # generate returns the prompt, both streams aligned to the longer one, then the new tokens.
    prompt_len = inputs["input_ids"].shape[1]
    if inputs.get("source_input_ids") is not None:
        prompt_len = max(prompt_len, inputs["source_input_ids"].shape[1])
    sequences = sequences[:, prompt_len:]
    return [decode_answer(tokenizer, ids, first_line=first_line) for ids in sequences.tolist()]


def decode_answer(tokenizer, ids: list[int], *, first_line: bool = True) -> str:
    """Generated ids as an answer: cut at the first EOS, decoded without special tokens, [first line,] stripped."""
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return (text.split("\n")[0] if first_line else text).strip()


def score(task: Task, rows: Sequence[dict], predictions: Sequence) -> dict[str, float]:
    if task.kind == "classification":
        return classification_scores(list(predictions), [r["label"] for r in rows], task.num_labels)
    return qa_scores(list(predictions), [r["answers"]["text"] for r in rows])


@dataclasses.dataclass
class EvalResult:
    task: str
    split: str
    per_language: dict[str, dict[str, float]]  # lang -> {metric: value, "n": rows}
    average: dict[str, float]
    primary: str  # the model-selection metric
    method: str | None = None  # the run's --method and (resolved) --eval-mode, set by flare train / flare eval
    eval_mode: str | None = None
    scoring: str | None = None  # how decoder predictions were scored (scoring_name); None: encoders

    @property
    def score(self) -> float:
        return self.average[self.primary]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        metrics = [m for m in next(iter(self.per_language.values())) if m != "n"] if self.per_language else []
        head = ["lang", "n"] + metrics
        lines = [[lang, str(int(v["n"]))] + [f"{v[m]:.2f}" for m in metrics] for lang, v in self.per_language.items()]
        lines.append(
            ["avg", str(sum(int(v["n"]) for v in self.per_language.values()))]
            + [f"{self.average[m]:.2f}" for m in metrics]
        )
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
        title = f"{self.task} / {self.split}"
        if self.method is not None:
            title += f" (method {self.method}, eval mode {self.eval_mode})"
        if self.scoring is not None:
            title += f" (scoring {self.scoring})"
        rule = "-" * len(fmt(head))
        return "\n".join([title, fmt(head), rule, *map(fmt, lines[:-1]), rule, fmt(lines[-1])])


def evaluate(
    model,
    task: Task,
    tokenizer,
    family: str,
    rows_by_lang: dict[str, list[dict]],
    *,
    split: str,
    max_length: int,
    batch_size: int,
    use_source: bool,
    device: torch.device,
    autocast=None,
    progress: bool = False,
    should_stop=None,
    alignment: str = "ours",
    scoring: str = "ours",
) -> EvalResult:
    """Scores per language and their unweighted average (``should_stop``, alignment, scoring: see ``predict``)."""
    if not rows_by_lang:
        raise ValueError(f"no {split} rows to evaluate")
    per_language = {}
    for lang, rows in rows_by_lang.items():
        preds = predict(
            model,
            task,
            tokenizer,
            family,
            rows,
            max_length=max_length,
            batch_size=batch_size,
            use_source=use_source,
            device=device,
            autocast=autocast,
            progress=progress,
            desc=f"{split} {lang}",
            should_stop=should_stop,
            alignment=alignment,
            scoring=scoring,
        )
        per_language[lang] = {**score(task, rows, preds), "n": len(rows)}
    metrics = [m for m in next(iter(per_language.values())) if m != "n"]
    average = {m: sum(v[m] for v in per_language.values()) / len(per_language) for m in metrics}
    return EvalResult(
        task=task.name,
        split=split,
        per_language=per_language,
        average=average,
        primary=task.metric,
        scoring=scoring_name(task, family, scoring),
    )


def write_result(result: EvalResult, path: str | Path, **extra) -> None:
    from .data.files import atomic_write_text

    atomic_write_text(path, json.dumps({**result.to_dict(), **extra}, indent=2, ensure_ascii=False) + "\n")
