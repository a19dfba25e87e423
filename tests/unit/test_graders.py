"""Graders of reinforcement fine-tuning: OpenAI's shapes validated (and refused with the
reason at the right parameter), templates, the multi formula, and each type's score."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from core.grader_formula import Formula, FormulaError
from core.graders import Grader, MultiGrader, TemplateError, check_template, render
from workers.training.grading import GraderReward, score


class Holder(BaseModel):
    grader: Grader


def grader(**given: Any) -> Any:
    return Holder.model_validate({"grader": given}).grader


def refusal(**given: Any) -> tuple[str, str]:
    with pytest.raises(ValidationError) as caught:
        grader(**given)
    first = caught.value.errors()[0]
    return ".".join(str(p) for p in first["loc"]), first["msg"]


def check(operation: str, reference: str = "{{item.answer}}") -> Any:
    return grader(
        type="string_check",
        name="exact",
        input="{{sample.output_text}}",
        reference=reference,
        operation=operation,
    )


def similar(metric: str) -> Any:
    return grader(
        type="text_similarity",
        name="close",
        input="{{sample.output_text}}",
        reference="{{item.answer}}",
        evaluation_metric=metric,
    )


ITEM = {"messages": [], "answer": "Paris", "meta": {"level": 2}}


def test_string_check_operations() -> None:
    assert score(check("eq"), "Paris", ITEM) == 1.0
    assert score(check("eq"), "paris", ITEM) == 0.0
    assert score(check("ne"), "Lyon", ITEM) == 1.0
    assert score(check("like"), "It is Paris.", ITEM) == 1.0
    assert score(check("like"), "It is PARIS.", ITEM) == 0.0
    assert score(check("ilike"), "It is PARIS.", ITEM) == 1.0


def test_text_similarity_metrics_are_in_unit_range() -> None:
    sentence = {"answer": "the cat sat on the mat"}
    for metric in ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_5", "rouge_l"):
        assert score(similar(metric), sentence["answer"], sentence) == pytest.approx(1.0), metric
    assert score(similar("rouge_2"), "Paris", ITEM) == 0.0  # one word has no bigram
    assert 0.0 < score(similar("rouge_1"), "the cat sat", sentence) < 1.0
    assert score(similar("rouge_1"), "the cat sat", sentence) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert score(similar("rouge_5"), "the cat sat", sentence) == 0.0  # no 5-gram in common
    assert 0.5 < score(similar("fuzzy_match"), "Pariss", ITEM) < 1.0
    assert score(similar("bleu"), "dog", sentence) == 0.0
    assert score(similar("gleu"), "", sentence) == 0.0


def test_templates_render_item_fields_and_refuse_the_rest() -> None:
    assert render("{{ item.answer }}: {{item.meta}}", "x", ITEM) == 'Paris: {"level": 2}'
    assert render("{{sample.output_text}}!", "Lyon", ITEM) == "Lyon!"
    with pytest.raises(KeyError):
        render("{{item.missing}}", "x", ITEM)
    for bad, why in (
        ("{{sample.output_json}}", "completions are text"),
        ("{{item.meta.level}}", "only top-level"),
        ("{{answer}}", "names neither"),
    ):
        with pytest.raises(TemplateError, match=why):
            check_template(bad)


def test_multi_grader_combines_named_scores_with_its_formula() -> None:
    multi = grader(
        type="multi",
        name="both",
        graders={"exact": check("eq").model_dump(), "close": similar("fuzzy_match").model_dump()},
        calculate_output="max(exact, 0.25) * 2 - abs(-0.5) + (close / 4)",
    )
    assert isinstance(multi, MultiGrader) and multi.item_fields == {"answer"}
    assert score(multi, "Paris", ITEM) == pytest.approx(2.0 - 0.5 + 0.25)
    assert score(multi, "Lyon", ITEM) < 0.5
    reward = GraderReward(multi)
    assert reward.__name__ == "grader"  # TRL's metric: rewards/grader/mean
    assert reward(completions=["Paris", "x"], item=['{"answer": "Paris"}'] * 2)[0] == 1.75


def test_formula_grammar() -> None:
    assert Formula.parse("-(a + 2) * 3 / b").evaluate({"a": 1, "b": 2}) == -4.5
    assert Formula.parse("1 - 2 - 3").evaluate({}) == -4  # left to right
    assert Formula.parse("a / 0").evaluate({"a": 1}) == 0.0
    assert Formula.parse(" min(a, b, .5) ").names == {"a", "b"}
    for bad, why in (
        ("a +", "expected a number"),
        ("a b", "unexpected 'b'"),
        ("exp(a)", "unknown function 'exp'"),
        ("__import__('os')", 'unexpected "\'"'),
        ("a ** 2", "expected a number"),
        ("abs(a, b)", "abs takes 1 argument"),
        ("a; b", "unexpected ';'"),
        ("(" * 40 + "a" + ")" * 40, "nested more than"),
        ("  ", "empty"),
    ):
        with pytest.raises(FormulaError, match=why):
            Formula.parse(bad)


def test_refusals_name_the_parameter_and_say_why() -> None:
    assert refusal(type="python", name="p", source="def grade(s, i): return 1") == (
        "grader.type",
        "Value error, python graders are not offered: they run the caller's code, and "
        "Modelyard has no sandbox to run it in yet",
    )
    loc, message = refusal(type="score_model", name="s", model="gpt-4o", input=[])
    assert loc == "grader.type" and "not built" in message
    loc, message = refusal(type="label_model", name="l")
    assert loc == "grader.type" and "not built" in message
    loc, message = refusal(
        type="text_similarity", name="c", input="a", reference="b", evaluation_metric="cosine"
    )
    assert loc == "grader.evaluation_metric" and "embeddings model" in message
    loc, message = refusal(
        type="text_similarity", name="c", input="a", reference="b", evaluation_metric="meteor"
    )
    assert loc == "grader.evaluation_metric" and "WordNet" in message
    loc, message = refusal(
        type="multi",
        name="m",
        graders={"inner": {"type": "multi", "name": "i", "graders": {}, "calculate_output": "1"}},
        calculate_output="inner",
    )
    assert loc == "grader.graders.inner.type" and "string_check or text_similarity" in message
    loc, message = refusal(
        type="multi",
        name="m",
        graders={"a": check("eq").model_dump()},
        calculate_output="a + b",
    )
    assert loc == "grader.calculate_output" and "names b, which are not keys" in message
    loc, _ = refusal(
        type="string_check", name="s", input="x", reference="y", operation="eq", pass_threshold=1
    )
    assert loc == "grader.pass_threshold"  # nothing is ignored
    loc, message = refusal(type="string_check", name="s", input="x", reference="y", operation="in")
    assert loc == "grader.operation"
