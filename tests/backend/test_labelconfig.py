"""Labeling config XML -> PredictionPlan: what is predicted, the conventions, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.labelstudio.config import (
    Condition,
    LabelConfigError,
    PredictionPlan,
    TaxonomyNode,
    parse_label_config,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "labelstudio"

BRUSH = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
  <Choices name="color" toName="image" perRegion="true"><Choice value="red"/><Choice value="blue"/></Choices>
  <Choices name="tags" toName="image" perRegion="true" choice="multiple">
    <View><Choice value="furry"/></View><Choice value="striped"/>
  </Choices>
  <TextArea name="caption" toName="image" perRegion="true"/>
  <TextArea name="Detailed_Description" toName="image" perRegion="true"/>
  <Choices name="quality" toName="image"><Choice value="good"/><Choice value="bad"/></Choices>
  <TextArea name="notes" toName="image"/>
</View>"""


def test_example_configs_parse_into_plans():
    paths = sorted(EXAMPLES.glob("*.xml"))
    assert len(paths) >= 4
    for path in paths:
        plan = parse_label_config(path.read_text())
        assert plan.image == "image" and plan.image_key == "image", path.name
        assert plan.tools and plan.predicts_anything, path.name


def test_brush_plan_has_category_attributes_and_descriptions():
    plan = parse_label_config(BRUSH)
    assert [(t.name, t.type, t.labels) for t in plan.tools] == [("tag", "brushlabels", ("cat", "dog"))]
    assert plan.tools[0].geometry == "brush"
    attrs = {a.name: a for a in plan.attributes}
    assert attrs["color"].choices == ("red", "blue") and not attrs["color"].multiple
    assert attrs["tags"].choices == ("furry", "striped") and attrs["tags"].multiple  # nested <View> choice found
    # The naming convention: "detail" anywhere in the name (any case) -> detailed, else short.
    assert {d.name: d.detail for d in plan.descriptions} == {"caption": "short", "Detailed_Description": "detailed"}
    # Image-level controls are not predicted but are known, so their results are skipped, not errors.
    assert "quality" not in attrs and set(plan.other_controls) == {"quality", "notes"}
    assert [(c.control, c.type, c.labels) for c in plan.categories("tag", "brushlabels")] == [
        ("tag", "brushlabels", ("cat", "dog"))
    ]


def test_plain_tools_take_their_labels_from_labels_controls():
    plan = parse_label_config((EXAMPLES / "polygon_rectangle.xml").read_text())
    box = plan.tool("box")
    assert box is not None and box.type == "rectangle" and not box.is_labels_tool and box.labels == ()
    # Split format: a plain Rectangle region is labelled through the <Labels> control.
    assert [(c.control, c.type) for c in plan.categories("box", "rectangle")] == [("object", "labels")]
    # Merged format: a result from the <Labels> control with a geometry type answers in that type.
    assert [(c.control, c.type) for c in plan.categories("object", "rectanglelabels")] == [
        ("object", "rectanglelabels")
    ]
    assert plan.tool_for_geometry("rectangle") == box
    assert plan.categories("part", "polygonlabels")[0].labels == ("wheel", "window", "door")


def test_taxonomy_tree_and_aliases():
    plan = parse_label_config("""<View>
      <Image name="img" value="$photo"/>
      <Rectangle name="r" toName="img"/>
      <Taxonomy name="kind" toName="img" perRegion="true">
        <Choice value="Animal"><Choice value="Cat" alias="cat"/><Choice value="Dog"/></Choice>
        <Choice value="Plant"/>
      </Taxonomy>
    </View>""")
    assert plan.image == "img" and plan.image_key == "photo"
    (taxonomy,) = plan.taxonomies
    assert taxonomy.roots == (
        TaxonomyNode("Animal", (TaxonomyNode("cat"), TaxonomyNode("Dog"))),
        TaxonomyNode("Plant"),
    )
    assert plan.predicts_anything  # a plain tool without labels still gets its taxonomy path


def test_conditions_are_read():
    plan = parse_label_config("""<View>
      <Image name="image" value="$image"/>
      <RectangleLabels name="box" toName="image"><Label value="cat"/><Label value="dog"/></RectangleLabels>
      <Choices name="fur" toName="image" perRegion="true" whenTagName="box" whenLabelValue="cat,dog">
        <Choice value="long"/><Choice value="short"/></Choices>
      <Choices name="fur_color" toName="image" perRegion="true" whenTagName="fur" whenChoiceValue="long">
        <Choice value="grey"/><Choice value="ginger"/></Choices>
      <TextArea name="box_note" toName="image" perRegion="true" whenTagName="box"/>
    </View>""")
    conditions = {a.name: a.condition for a in plan.attributes}
    assert conditions == {"fur": Condition("label", "cat,dog"), "fur_color": Condition("choice", "long")}
    assert Condition("label", "cat,dog").values() >= {"cat", "dog"}
    assert plan.descriptions[0].condition == Condition("tag", "box")


def test_xml_declaration_is_accepted():
    declared = '<?xml version="1.0" encoding="utf-8"?>\n' + BRUSH
    assert parse_label_config(declared) == parse_label_config(BRUSH)


def test_plan_round_trips_through_json():
    for path in sorted(EXAMPLES.glob("*.xml")):
        plan = parse_label_config(path.read_text())
        data = json.loads(json.dumps(plan.to_dict()))
        assert data == plan.to_dict()
        assert PredictionPlan.from_dict(data) == plan


def test_malformed_plan_payload_is_a_clear_error():
    with pytest.raises(LabelConfigError, match="malformed prediction plan"):
        PredictionPlan.from_dict({"image": "image"})


def test_first_image_with_a_region_tool_is_used():
    plan = parse_label_config("""<View>
      <Image name="thumb" value="$thumb"/>
      <Image name="full" value="$full"/>
      <PolygonLabels name="p" toName="full"><Label value="a"/></PolygonLabels>
      <PolygonLabels name="q" toName="thumb2"><Label value="a"/></PolygonLabels>
    </View>""")
    assert (plan.image, plan.image_key) == ("full", "full")
    assert [t.name for t in plan.tools] == ["p"] and "q" in plan.other_controls


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("<View><Image name='i' value='$i'", "not valid XML"),
        ("", "empty"),
        ("not xml at all", "not valid XML"),
        ('<!DOCTYPE x [<!ENTITY a "b">]><View><Image name="i" value="$i"/></View>', "DOCTYPE"),
        ('<View><Text name="t" value="$text"/><Labels name="l" toName="t"><Label value="a"/></Labels></View>',
         "no <Image>"),
        ('<View><Image name="i" value="$i"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>',
         "no region control"),
        ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="other"><Label value="a"/>'
         "</RectangleLabels></View>", "no region control"),
        ('<View><Image name="i" value="http://x/a.png"/><RectangleLabels name="r" toName="i"><Label value="a"/>'
         "</RectangleLabels></View>", 'value="\\$image"'),
        ('<View><Image name="i" value="$i"/><Rectangle name="r" toName="i"/></View>', "nothing to predict"),
        ('<View><Image name="i" value="$i"/><Rectangle name="r" toName="i"/>'
         '<Choices name="c" toName="i"><Choice value="a"/></Choices><TextArea name="t" toName="i"/></View>',
         "nothing to predict"),
    ],
)
def test_unusable_configs_raise_label_config_error(config, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(config)
    assert issubclass(LabelConfigError, ValueError)


def test_neutral_plan_names_categories_after_their_controls_and_round_trips():
    from backend.service.tasks import Category, Plan

    plan = parse_label_config((EXAMPLES / "polygon_rectangle.xml").read_text())
    neutral = plan.to_plan()
    assert [c.name for c in neutral.categories] == ["part", "object"]  # a *Labels tool, then a <Labels> control
    assert neutral.category("object") == Category("object", ("car", "bus", "bicycle", "person"))
    assert neutral.attributes == plan.attributes and neutral.descriptions == plan.descriptions
    assert neutral.mask_target is None  # no brush tool: SAM masks cannot be shown as regions
    assert Plan.from_dict(json.loads(json.dumps(neutral.to_dict()))) == neutral

    sam = parse_label_config((EXAMPLES / "keypoint_sam.xml").read_text()).to_plan()
    assert sam.mask_target is not None and sam.mask_target.meta == {"from_name": "mask", "type": "brushlabels"}
    assert sam.mask_target.categories == ("mask",) and sam.mask_target.tags == ("mask",)
