"""Graders of reinforcement fine-tuning, in OpenAI's JSON shapes: what scores a completion.

Offered: `string_check`, `text_similarity` (the metrics computed here without a download)
and `multi` (a formula over named graders of those two types). Refused, with the reason:
`python` (it runs the caller's code, and no sandbox is built yet), `score_model` and
`label_model` (graders that call a model are not built), and the `cosine` and `meteor`
metrics (cosine needs an embeddings model, meteor WordNet's data).

`input` and `reference` are templates: `{{sample.output_text}}` is the completion's text,
`{{item.<field>}}` a top-level field of the dataset row (a string as it is, anything else
as JSON). Scores are computed by workers/training/grading.py.
"""

from __future__ import annotations

import functools
import json
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from core.grader_formula import Formula, FormulaError

SAMPLE_OUTPUT_TEXT = "sample.output_text"
MAX_TEMPLATE_CHARS = 32_000
MAX_MULTI_GRADERS = 16
_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_ITEM_FIELD = re.compile(r"^item\.([A-Za-z0-9_\-]{1,64})$")

GraderName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
GraderKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
Template = Annotated[str, StringConstraints(max_length=MAX_TEMPLATE_CHARS)]

REFUSED_GRADER_TYPES = {
    "python": "python graders are not offered: they run the caller's code, and Modelyard "
    "has no sandbox to run it in yet",
    "score_model": "score_model graders are not built: a grader that calls a model is not "
    "offered; use string_check, text_similarity or multi",
    "label_model": "label_model graders are not built: a grader that calls a model is not "
    "offered; use string_check, text_similarity or multi",
}


class SimilarityMetric(StrEnum):
    """The text_similarity metrics computed here, each in [0, 1]."""

    FUZZY_MATCH = "fuzzy_match"  # rapidfuzz's WRatio (a Levenshtein ratio) / 100
    BLEU = "bleu"  # sacrebleu's sentence BLEU / 100
    GLEU = "gleu"  # nltk's sentence GLEU (Google BLEU) over whitespace tokens
    ROUGE_1 = "rouge_1"  # rouge-score's F-measure of unigrams
    ROUGE_2 = "rouge_2"
    ROUGE_3 = "rouge_3"
    ROUGE_4 = "rouge_4"
    ROUGE_5 = "rouge_5"
    ROUGE_L = "rouge_l"  # rouge-score's F-measure of the longest common subsequence


REFUSED_METRICS = {
    "cosine": "cosine similarity needs an embeddings model, which the graders do not load",
    "meteor": "meteor needs WordNet's data, which is not downloaded",
}


class TemplateError(ValueError):
    """Raised when a grader template names something other than the sample's text or an
    item field."""


def placeholders(template: str) -> list[str]:
    """What each `{{...}}` of `template` names, stripped."""
    return [m.group(1).strip() for m in _PLACEHOLDER.finditer(template)]


def check_template(template: str) -> str:
    for name in placeholders(template):
        if name == SAMPLE_OUTPUT_TEXT or _ITEM_FIELD.match(name):
            continue
        if name.startswith("sample."):
            raise TemplateError(
                f"{{{{{name}}}}} is not offered: completions are text, graded as "
                f"{{{{{SAMPLE_OUTPUT_TEXT}}}}}"
            )
        if name.startswith("item.") and "." in name.removeprefix("item."):
            raise TemplateError(f"{{{{{name}}}}}: only top-level item fields can be named")
        raise TemplateError(
            f"{{{{{name}}}}} names neither {{{{{SAMPLE_OUTPUT_TEXT}}}}} nor an item field "
            "({{item.<field>}})"
        )
    return template


def template_item_fields(template: str) -> set[str]:
    """The item fields `template` reads."""
    found = set()
    for name in placeholders(template):
        match = _ITEM_FIELD.match(name)
        if match is not None:
            found.add(match.group(1))
    return found


def _item_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(template: str, output_text: str, item: dict[str, Any]) -> str:
    """`template` with the completion's text and the row's fields in place; a field the row
    lacks raises KeyError."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1).strip()
        if name == SAMPLE_OUTPUT_TEXT:
            return output_text
        field = _ITEM_FIELD.match(name)
        if field is None:  # check_template refused it
            raise TemplateError(f"{{{{{name}}}}} cannot be rendered")
        return _item_text(item[field.group(1)])

    return _PLACEHOLDER.sub(value, template)


class _TemplatedGrader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: GraderName
    input: Template = Field(description="The text graded, e.g. {{sample.output_text}}.")
    reference: Template = Field(description="The text it is graded against, e.g. {{item.answer}}.")

    @field_validator("input", "reference")
    @classmethod
    def _known_placeholders(cls, template: str) -> str:
        return check_template(template)

    @property
    def item_fields(self) -> set[str]:
        return template_item_fields(self.input) | template_item_fields(self.reference)


class StringCheckGrader(_TemplatedGrader):
    """1 when `input` and `reference` pass `operation`, else 0: `eq` equal, `ne` not equal,
    `like` input contains reference, `ilike` the same ignoring case."""

    type: Literal["string_check"]
    operation: Literal["eq", "ne", "like", "ilike"]


def _metric_offered(value: Any) -> Any:
    if isinstance(value, str) and value in REFUSED_METRICS:
        raise ValueError(f"evaluation_metric {value} is not offered: {REFUSED_METRICS[value]}")
    return value


class TextSimilarityGrader(_TemplatedGrader):
    """How similar `input` is to `reference` by `evaluation_metric`, in [0, 1]."""

    type: Literal["text_similarity"]
    evaluation_metric: Annotated[SimilarityMetric, BeforeValidator(_metric_offered)]


SimpleGrader = StringCheckGrader | TextSimilarityGrader


class _GraderType(BaseModel):
    """Only to refuse a grader type, with its reason, at the `type` parameter."""

    type: str

    @field_validator("type")
    @classmethod
    def _refused(cls, value: str, info: ValidationInfo) -> str:
        if value in REFUSED_GRADER_TYPES:
            raise ValueError(REFUSED_GRADER_TYPES[value])
        offered = " or ".join(sorted((info.context or {}).get("offered", ())))
        raise ValueError(f"grader type {value!r} is not offered here; offered: {offered}")


_SIMPLE_GRADERS: dict[str, type[BaseModel]] = {
    "string_check": StringCheckGrader,
    "text_similarity": TextSimilarityGrader,
}


def _typed(value: Any, graders: dict[str, type[BaseModel]]) -> Any:
    """The grader of `value`'s type, validated as that type (so that an error names the
    grader's own fields), or a refusal naming `type` and the reason."""
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValueError(f"a grader is an object with a type: {' or '.join(sorted(graders))}")
    model = graders.get(value["type"])
    if model is None:
        _GraderType.model_validate({"type": value["type"]}, context={"offered": graders})
    assert model is not None
    return model.model_validate(value)


def _simple_grader(value: Any) -> Any:
    return value if isinstance(value, BaseModel) else _typed(value, _SIMPLE_GRADERS)


class MultiGrader(BaseModel):
    """Its graders' scores combined by `calculate_output`, a formula over their keys."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["multi"]
    name: GraderName
    graders: dict[GraderKey, Annotated[SimpleGrader, BeforeValidator(_simple_grader)]] = Field(
        min_length=1, max_length=MAX_MULTI_GRADERS
    )
    calculate_output: str = Field(
        min_length=1,
        max_length=1000,
        description="e.g. (name + email) / 2: + - * / parentheses, numbers, the graders' "
        "keys, min(...), max(...), abs(x).",
    )

    @field_validator("calculate_output")
    @classmethod
    def _formula_of_known_graders(cls, text: str, info: ValidationInfo) -> str:
        try:
            formula = Formula.parse(text)
        except FormulaError as exc:
            raise ValueError(f"calculate_output: {exc}") from exc
        graders = info.data.get("graders")
        if graders is not None:
            unknown = sorted(formula.names - set(graders))
            if unknown:
                raise ValueError(
                    f"calculate_output names {', '.join(unknown)}, which are not keys of "
                    f"graders ({', '.join(sorted(graders))})"
                )
        return text

    @property
    def formula(self) -> Formula:
        return _parsed(self.calculate_output)

    @property
    def item_fields(self) -> set[str]:
        return set().union(*(g.item_fields for g in self.graders.values()))


@functools.lru_cache(maxsize=256)
def _parsed(text: str) -> Formula:
    """A formula parsed once, not once per graded completion."""
    return Formula.parse(text)


def _any_grader(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value
    return _typed(value, {**_SIMPLE_GRADERS, "multi": MultiGrader})


Grader = Annotated[
    StringCheckGrader | TextSimilarityGrader | MultiGrader, BeforeValidator(_any_grader)
]
"""What a reinforcement job's completions are scored by."""
