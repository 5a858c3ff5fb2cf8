"""Which rows each stage reads, for each task (the paper's translate-train / translate-test setup).

task    stage 1 (English)         stage 2 train (target + English)      validation / test (+ English)
toy     bundled sample, English   bundled sample (its English column)   bundled sample
xnli    facebook/xnli "en" train  xnli <lang> train + "en" (same row)   xnli <lang> validation / test
nusax   NusaX "eng" train         NusaX <lang> train + "eng" (same id)  NusaX <lang> validation / test
tydiqa  SQuAD v1.1 train          --train-file (translate-train)        --eval-file / GoldP validation

(XNLI's non-English train splits are MultiNLI machine-translated by the XNLI authors; TyDiQA-GoldP
has no target-language training set of the right kind, so stage 2 reads flare translate's output.)
The authors' choices (``--recipe paper``): ``tydiqa_stage1="goldp-english"`` reads TyDiQA-GoldP's
English train rows for stage 1 instead of SQuAD; ``xnli_train="translated"`` trains XNLI's stage 2
on their own NLLB translation of the English train set, which must come as ``--train-file``.

Any of these can be replaced by a file (``stage1_file``, ``train_file``, ``eval_file``,
``test_file``). The English side of validation/test rows comes from a translation file
(``eval_translations`` / ``test_translations``: translate-test, the paper's setting), from the
dataset's own English rows (``eval_source="parallel"``: an oracle, not the paper's setting), or is
not used (``eval_source="none"``: plain LoRA inference). Rows that lack their English are reported
(count and ids) and either stop the run or are dropped (``missing_source``). Only rows whose English is
read are checked (flare.train.methods): translate-train LoRA trains without it, the target and zero-shot
eval modes score without it, and a run that reuses a stage 1 (``stage1_from``) reads no stage-1 rows.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

from ..data import hub
from ..data.files import attach_translations, read_rows, read_translations
from ..data.schema import SourceReport, require_sources
from ..default.sample import load_sample
from ..tasks import Task
from .config import TrainConfig
from .methods import STAGE1_MODES, resolve_eval_mode, trains_on_english, uses_english

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StageData:
    stage1: list[dict]
    train: list[dict]
    eval: dict[str, list[dict]]  # lang -> rows (model selection)
    test: dict[str, list[dict]]  # lang -> rows (final table)
    reports: list[SourceReport]


def _by_lang(rows: list[dict], languages: tuple[str, ...]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        if not languages or r["lang"] in languages:
            out.setdefault(r["lang"], []).append(r)
    return dict(sorted(out.items()))


def _limit(rows: list[dict], n: int | None) -> list[dict]:
    return rows if n is None else rows[:n]


def _limit_languages(rows: list[dict], n: int | None) -> list[dict]:
    """At most n rows taken in turn from each language, so a cap on a multilingual training set keeps
    every language rather than the first ones only (files and hub data list one language after another)."""
    if n is None or len(rows) <= n:
        return rows
    groups = list(_by_lang(rows, ()).values())
    turns = (g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g))
    return list(itertools.islice(turns, n))


def _hub_rows(cfg: TrainConfig, task: Task, lang: str, split: str, parallel: bool) -> list[dict]:
    path = cfg.dataset_path
    source = "parallel" if parallel else None
    if task.name == "xnli":
        return hub.load_xnli(lang, split, path=path or hub.XNLI_HUB, source=source)
    if task.name == "nusax":
        return hub.load_nusax(lang, split, path=path or hub.NUSAX_HUB, source=source)
    if task.name == "tydiqa":
        if parallel:
            raise ValueError("TyDiQA has no parallel English; use translation files (eval_source='file')")
        return hub.load_tydiqa(lang, split, path=path or hub.TYDIQA_HUB)
    raise ValueError(f"task {task.name!r} has no hub loader")


def _stage1_rows(cfg: TrainConfig, task: Task) -> list[dict]:
    if cfg.stage1_file:
        return read_rows(cfg.stage1_file, task.kind, lang="en", label_names=task.labels or None)
    if task.name == "toy":
        return load_sample("train", english=True)
    if task.name == "xnli":
        return hub.load_xnli("en", "train", path=cfg.english_path or cfg.dataset_path or hub.XNLI_HUB)
    if task.name == "nusax":
        return hub.load_nusax(hub.NUSAX_ENGLISH, "train", path=cfg.english_path or cfg.dataset_path or hub.NUSAX_HUB)
    if cfg.tydiqa_stage1 == "goldp-english":  # the authors': TyDiQA-GoldP's own English rows, from its dataset
        return hub.load_tydiqa_english("train", path=cfg.dataset_path or hub.TYDIQA_HUB)
    return hub.load_squad("train", path=cfg.english_path or hub.SQUAD_HUB)


def _split_rows(
    cfg: TrainConfig,
    task: Task,
    split: str,
    file: str | None,
    translations: str | None,
    languages: tuple[str, ...],
    parallel: bool,
) -> list[dict]:
    if file:
        rows = read_rows(file, task.kind, label_names=task.labels or None)
    elif task.name == "toy":
        rows = load_sample(split)
    elif task.name == "tydiqa" and split == "train":
        raise ValueError(
            "TyDiQA has no target-language training set: translate SQuAD into each language first "
            "(flare translate --task tydiqa --mode train ...) and pass the output as --train-file"
        )
    else:
        hub_split = {"test": "validation"} if task.name == "tydiqa" else {}
        rows = [r for lang in languages for r in _hub_rows(cfg, task, lang, hub_split.get(split, split), parallel)]
    if translations:  # attached before the language filter: the file may cover languages not selected here
        rows = _attach(rows, translations, task, split)
    found = {r["lang"] for r in rows}
    rows = [r for r in rows if r["lang"] in languages]
    if cfg.languages:  # languages named by the user must all have rows (a typo must not vanish silently)
        absent = [lang for lang in cfg.languages if lang not in found]
        if absent:
            hub_name = cfg.dataset_path or f"the {task.name} data"
            where = file or ("the built-in sample" if task.name == "toy" else hub_name)
            raise ValueError(
                f"--languages: no {split} rows for {', '.join(map(repr, absent))} in {where}; languages found there: "
                f"{', '.join(sorted(found)) or 'none'}"
            )
    return rows


def _attach(rows: list[dict], translations: str, task: Task, split: str) -> list[dict]:
    """Rows with their English from a translation file, refusing a file whose ids match none of the rows."""
    by_id = read_translations(translations)  # keyed by (lang or None, id): see flare.data.files.Translations
    row_ids = {str(r["id"]) for r in rows}
    matched = by_id.matching(rows)
    if by_id and rows and not matched:
        raise ValueError(
            f"{translations}: none of its {len(by_id)} ids matches one of the {len(rows)} {split} rows "
            f"(its ids: {', '.join(i for _, i in list(by_id)[:3])}, ...; the rows': {', '.join(sorted(row_ids)[:3])}, "
            "...); translations attach to rows by language and id: was it made from this split's rows?"
        )
    unmatched = len(by_id) - len(matched)
    if unmatched:
        example = next(i for key, i in by_id if (key, i) not in matched)
        logger.warning(
            "%s: %d of its %d ids match no %s row (e.g. %r); those translations are not used",
            translations, unmatched, len(by_id), split, example,
        )  # fmt: skip
    rows, _ = attach_translations(rows, by_id, task.kind, name=split)
    return rows


def load_stage_data(cfg: TrainConfig, task: Task) -> StageData:
    """All rows of a run, sources checked (reports kept for the run summary)."""
    languages = cfg.languages or task.languages
    reports: list[SourceReport] = []
    trains_stage1 = "stage1" in cfg.stages and cfg.stage1_from is None  # --stage1-from: no English rows to read
    stage1 = _limit(_stage1_rows(cfg, task), cfg.max_train_examples) if trains_stage1 else []

    train: list[dict] = []
    if "stage2" in cfg.stages:
        train = _split_rows(cfg, task, "train", cfg.train_file, cfg.train_translations, languages, parallel=True)
        if trains_on_english(cfg.method):  # translate-train LoRA reads the target text only
            train, report = require_sources(train, task.kind, name="train", policy=cfg.missing_source)
            reports.append(report)
        train = _limit_languages(train, cfg.max_train_examples)
        if not train:
            raise ValueError(f"no stage-2 training rows for languages {languages}")

    splits = {split: load_eval_rows(cfg, task, split, reports) for split in ("validation", "test")}
    for report in reports:
        if report.missing:
            logger.warning(report.message())
    return StageData(stage1=stage1, train=train, eval=splits["validation"], test=splits["test"], reports=reports)


def load_eval_rows(
    cfg: TrainConfig, task: Task, split: str, reports: list[SourceReport] | None = None, mode: str | None = None
) -> dict[str, list[dict]]:
    """Validation or test rows by language, with their English source where the eval mode reads it (``mode``:
    the resolved eval mode, default the run's; target and zero-shot need none) and eval_source is not "none"."""
    languages = cfg.languages or task.languages
    file, translations = (
        (cfg.eval_file, cfg.eval_translations) if split == "validation" else (cfg.test_file, cfg.test_translations)
    )
    if task.name == "tydiqa" and split == "validation" and not file:
        return {}  # TyDiQA-GoldP's validation split is its test set: no selection set by default
    rows = _split_rows(cfg, task, split, file, translations, languages, parallel=cfg.eval_source == "parallel")
    mode = mode or resolve_eval_mode(cfg.method, cfg.eval_mode, cfg.eval_source)
    scored = "stage2" in cfg.stages or mode in STAGE1_MODES  # a stage-1-only run scores nothing otherwise
    if cfg.eval_source != "none" and scored and uses_english(cfg.method, mode):
        rows, report = require_sources(rows, task.kind, name=split, policy=cfg.missing_source)
        if reports is not None:
            reports.append(report)
    return {k: _limit(v, cfg.max_eval_examples) for k, v in _by_lang(rows, languages).items()}
