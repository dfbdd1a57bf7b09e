"""Property tests of label-config interpretation (hypothesis): any string, any tree of Label Studio tags
with odd attributes and values, and the classic XML attacks give a plan or a `LabelConfigError` (a 422),
never another exception; every plan round-trips exactly through its JSON job form.
"""

from __future__ import annotations

import json
from xml.sax.saxutils import quoteattr

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.labelstudio.config import LabelConfigError, PredictionPlan, parse_label_config

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TAGS = ("View", "Image", "BrushLabels", "PolygonLabels", "RectangleLabels", "EllipseLabels", "KeyPointLabels",
        "Brush", "Polygon", "Rectangle", "Labels", "Label", "Choices", "Choice", "TextArea", "Taxonomy", "Header",
        "Number", "Relations", "Text")
ATTRS = ("name", "toName", "value", "perRegion", "choice", "smart", "whenLabelValue", "whenChoiceValue",
         "whenTagName", "visibleWhen", "background")
odd_text = st.one_of(st.sampled_from(["image", "$image", "tag", "a", "true", "false", "multiple", "<image>",
                                      "</s>", "$", "", " ", "x" * 300]),
                     st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                             max_size=12))


@st.composite
def element(draw, depth: int = 0) -> str:
    tag = draw(st.sampled_from(TAGS))
    attrs = draw(st.dictionaries(st.sampled_from(ATTRS), odd_text, max_size=4))
    rendered = "".join(f" {k}={quoteattr(v)}" for k, v in attrs.items())
    children = draw(st.lists(element(depth + 1), max_size=0 if depth > 3 else 4))
    return f"<{tag}{rendered}>{''.join(children)}</{tag}>"


@st.composite
def plausible_config(draw) -> str:
    """Mostly-valid configs: an image, a region tool with labels, per-region controls, mutated a little."""
    labels = draw(st.lists(odd_text, min_size=1, max_size=6))
    tool = draw(st.sampled_from(["BrushLabels", "PolygonLabels", "RectangleLabels", "EllipseLabels", "KeyPointLabels"]))
    choice_values = draw(st.lists(odd_text, min_size=1, max_size=5))
    extra = draw(st.lists(element(2), max_size=2))
    label_xml = "".join(f"<Label value={quoteattr(v)}/>" for v in labels)
    choices_xml = "".join(f"<Choice value={quoteattr(v)}/>" for v in choice_values)
    multiple = draw(st.sampled_from(["single", "multiple", "single-radio", "bogus"]))
    return (f'<View><Image name="image" value="$image"/>'
            f'<{tool} name="tag" toName="image">{label_xml}</{tool}>'
            f'<Choices name="attr" toName="image" perRegion="true" choice="{multiple}">{choices_xml}</Choices>'
            f'<TextArea name="caption" toName="image" perRegion="true"/>{"".join(extra)}</View>')


def _parse(config: str) -> PredictionPlan | None:
    try:
        return parse_label_config(config)
    except LabelConfigError as e:
        assert str(e)
        return None


def _round_trips(plan: PredictionPlan) -> None:
    data = json.loads(json.dumps(plan.to_dict()))
    assert PredictionPlan.from_dict(data) == plan


@FUZZ
@given(st.text(max_size=300))
def test_any_string(config):
    plan = _parse(config)
    if plan is not None:
        _round_trips(plan)


@FUZZ
@given(element())
def test_random_tag_trees(config):
    plan = _parse(config)
    if plan is not None:
        _round_trips(plan)


@FUZZ
@given(plausible_config())
def test_plausible_configs(config):
    plan = _parse(config)
    if plan is not None:
        _round_trips(plan)


def test_billion_laughs_is_refused_quickly():
    bomb = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
            + "".join(f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10))
            + ']><View><Image name="image" value="$image"/><BrushLabels name="t" toName="image">'
            '<Label value="&lol9;"/></BrushLabels></View>')
    plan = _parse(bomb)
    if plan is not None:  # entities left unexpanded are fine; expanded ones would be a billion characters
        assert all(len(label) < 10_000 for label in plan.tools[0].labels)


def test_external_entity_is_not_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-VALUE")
    xxe = (f'<?xml version="1.0"?><!DOCTYPE v [<!ENTITY x SYSTEM "file://{secret}">]>'
           '<View><Image name="image" value="$image"/><BrushLabels name="t" toName="image">'
           '<Label value="&x;"/></BrushLabels></View>')
    plan = _parse(xxe)
    if plan is not None:
        assert "TOP-SECRET-VALUE" not in json.dumps(plan.to_dict())


def test_very_deep_nesting_is_a_clear_error():
    deep = '<View>' * 5000 + '<Image name="image" value="$image"/>' + '</View>' * 5000
    assert _parse(deep) is None
