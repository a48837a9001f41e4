"""Tasks: prompts per family, output schemas, parsers over realistic answers, boxes mapped back."""

from __future__ import annotations

import io
import json

import jsonschema
import numpy as np
import pytest
from PIL import Image, ImageOps

from vlm_serving import tasks
from vlm_serving.tasks import Box, ImageGeometry, ParseError


def stored_picture(orientation: int, size=(60, 40), rect=(10, 5, 25, 30)) -> bytes:
    """A JPEG-free PNG (lossless) holding one red rectangle at `rect` of its stored grid, tagged
    with the EXIF orientation."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    x1, y1, x2, y2 = rect
    pixels[y1:y2, x1:x2] = (255, 0, 0)
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "PNG", exif=exif.tobytes())
    return buffer.getvalue()


def red_box(image: Image.Image) -> tuple[int, int, int, int]:
    red = np.asarray(image)[:, :, 0] > 128
    ys, xs = np.nonzero(red)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("served", [(1.0, 1.0), (2.0, 0.5)])
def test_a_box_on_the_upright_resized_image_maps_to_the_stored_pixels(orientation, served):
    """PIL's own exif_transpose makes the upright picture; the model's box of the rectangle there,
    scaled to the served size, maps back to exactly where the rectangle is stored."""
    data = stored_picture(orientation)
    stored = Image.open(io.BytesIO(data))
    upright = ImageOps.exif_transpose(stored)
    served_w, served_h = round(upright.width * served[0]), round(upright.height * served[1])
    ux1, uy1, ux2, uy2 = red_box(upright)
    seen = [ux1 * served_w / upright.width, uy1 * served_h / upright.height,
            ux2 * served_w / upright.width, uy2 * served_h / upright.height]
    geometry = ImageGeometry(stored.width, stored.height, orientation, served_w, served_h)
    assert tasks.to_original(seen, "qwen2_5_vl", geometry) == Box(10, 5, 25, 30)
    per_mille = [ux1 * 1000 / upright.width, uy1 * 1000 / upright.height,
                 ux2 * 1000 / upright.width, uy2 * 1000 / upright.height]
    box = tasks.to_original(per_mille, "pixtral", geometry)
    assert (box.x_min, box.y_min, box.x_max, box.y_max) == pytest.approx((10, 5, 25, 30))


def test_boxes_are_clamped_to_the_image():
    geometry = ImageGeometry(100, 50, 1, 200, 100)
    assert tasks.to_original([-20, -5, 500, 80], "qwen2_5_vl", geometry) == Box(0, 0, 100, 40)


ONE = [ImageGeometry(640, 480, 1, 320, 240)]  # served at half size
TWO = ONE + [ImageGeometry(100, 200, 6, 100, 50)]  # stored 100x200, upright 200x100, served at half


def test_grounding_parses_qwens_fenced_json_amid_prose_and_maps_each_box():
    answer = ('Sure! Here are the objects:\n```json\n[\n  {"bbox_2d": [10, 20, 110, 220], "label": "cat"},\n'
              '  {"bbox_2d": [0, 0, 320, 240], "label": "sofa"}\n]\n```\nLet me know if you need more.')
    result = tasks.parse(tasks.GROUNDING, "qwen2_5_vl", answer, ONE)
    assert result == tasks.Detections([tasks.Detection("cat", Box(20, 40, 220, 440), 0),
                                       tasks.Detection("sofa", Box(0, 0, 640, 480), 0)])


def test_grounding_on_two_images_says_which_image_each_box_is_in():
    answer = '[{"bbox_2d": [0, 0, 500, 1000], "label": "a", "image": 2}, {"bbox_2d": [0, 0, 1000, 1000], "label": "b", "image": 1}]'
    result = tasks.parse(tasks.GROUNDING, "pixtral", answer, TWO)
    # image 2: stored 100x200 with orientation 6 (shown turned a quarter clockwise, 200x100): the
    # upright left half is the stored bottom half
    assert result.detections[0] == tasks.Detection("a", Box(0, 100, 100, 200), 1)
    assert result.detections[1] == tasks.Detection("b", Box(0, 0, 640, 480), 0)


@pytest.mark.parametrize("answer, problem", [
    ("I cannot see any objects.", "no JSON object or array"),
    ('[{"bbox_2d": [1, 2, 3, 4], "label": "x", "image": 3}]', "image number 3 is not one of 1 to 1"),
    ('"just a string"', "no JSON object or array"),
])
def test_malformed_grounding_answers_say_what_was_found(answer, problem):
    with pytest.raises(ParseError, match=problem):
        tasks.parse(tasks.GROUNDING, "qwen2_5_vl", answer, ONE)


def test_grounding_skips_items_without_a_box_and_accepts_a_wrapper_object():
    answer = '{"objects": [{"label": "cat"}, {"bbox": [0, 0, 32, 24], "label": "dog"}]}'
    result = tasks.parse(tasks.GROUNDING, "qwen2_5_vl", answer, ONE)
    assert result.detections == [tasks.Detection("dog", Box(0, 0, 64, 48), 0)]


def test_ocr_lines_with_and_without_boxes():
    answer = ('```json\n[{"bbox_2d": [0, 0, 160, 12], "text_content": "INVOICE 42"},'
              ' {"text_content": "Total: 9.99"}]\n```')
    result = tasks.parse(tasks.OCR, "qwen2_5_vl", answer, ONE)
    assert result.lines == [tasks.TextLine("INVOICE 42", Box(0, 0, 320, 24), 0), tasks.TextLine("Total: 9.99", None, 0)]


def test_document_strips_a_markdown_fence_and_keeps_tables():
    answer = "```markdown\n# Report\n\n| a | b |\n|---|---|\n| 1 | 2 |\n```"
    assert tasks.parse(tasks.DOCUMENT, "pixtral", answer, ONE) == tasks.Document("# Report\n\n| a | b |\n|---|---|\n| 1 | 2 |")


def test_chart_from_json_or_from_a_markdown_table():
    assert tasks.parse(tasks.CHART, "qwen2_5_vl", 'Table: {"header": ["year", "sales"], "rows": [["2023", 5], ["2024", "7"]]}',
                       ONE) == tasks.Table(["year", "sales"], [["2023", "5"], ["2024", "7"]])
    markdown = "Here it is:\n\n| year | sales |\n| --- | ---: |\n| 2023 | 5 |\n| 2024 | 7 |\n\nDone."
    assert tasks.parse(tasks.CHART, "pixtral", markdown, ONE) == tasks.Table(["year", "sales"], [["2023", "5"], ["2024", "7"]])
    with pytest.raises(ParseError, match="no JSON table and no Markdown table"):
        tasks.parse(tasks.CHART, "pixtral", "The chart shows growth.", ONE)


def test_caption_is_the_text_and_vqa_has_no_typed_result():
    assert tasks.parse(tasks.CAPTION, "pixtral", " A red square. \n", ONE) == tasks.Caption("A red square.")
    assert tasks.parse(tasks.VQA, "pixtral", "Yes.", ONE) is None


@pytest.mark.parametrize("task", tasks.STRUCTURED)
@pytest.mark.parametrize("image_count", [1, 3])
def test_structured_tasks_have_schemas_their_own_example_answers_satisfy(task, image_count):
    schema = tasks.output_schema(task, image_count)
    jsonschema.Draft202012Validator.check_schema(schema)
    example = {
        tasks.GROUNDING: [{"bbox_2d": [1, 2, 3, 4], "label": "cat"}],
        tasks.OCR: [{"bbox_2d": [1, 2, 3, 4], "text_content": "hi"}],
        tasks.CHART: {"header": ["x"], "rows": [["1"]]},
    }[task]
    if image_count > 1 and isinstance(example, list):
        with pytest.raises(jsonschema.ValidationError, match="'image' is a required property"):
            jsonschema.validate(example, schema)
        example = [{**item, "image": 3} for item in example]
    jsonschema.validate(example, schema)
    assert tasks.output_format(task, image_count).violations() == []


def test_each_family_gets_its_own_conventions_in_the_prompt():
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "red cars"}]}]
    qwen = tasks.apply_task(messages, tasks.GROUNDING, "qwen2_5_vl")
    assert qwen[0]["content"] == [{"type": "image"}, {"type": "text", "text":
                                  "Locate every red cars in the image, and output the bbox coordinates in JSON format."}]
    pixtral = tasks.apply_task(messages, tasks.GROUNDING, "pixtral")[0]["content"][1]["text"]
    assert "0-1000 scale" in pixtral and "red cars" in pixtral
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": ""}]}]
    assert "There are 2 images" in tasks.apply_task(two, tasks.OCR, "qwen2_5_vl")[0]["content"][2]["text"]
    assert messages[0]["content"][1]["text"] == "red cars", "the caller's messages are not changed"
    with pytest.raises(tasks.TaskError, match="needs a question"):
        tasks.apply_task([{"role": "user", "content": [{"type": "image"}]}], tasks.VQA, "pixtral")


# Whole answers of every task, each as the family writes it (Qwen2.5-VL in pixels of the image it saw,
# Pixtral per mille), and where max_tokens could cut each of them: after its second item or mid-sentence.
WHOLE = {
    tasks.CAPTION: "A cat sleeps on a red sofa next to a window.",
    tasks.VQA: "Two cats.",
    tasks.DOCUMENT: "# Invoice 42\n\n| item | price |\n|---|---|\n| tea | 3.50 |\n| cake | 4.00 |",
    tasks.GROUNDING: '[{"bbox_2d": [10, 20, 110, 220], "label": "cat"}, {"bbox_2d": [0, 0, 300, 200], "label": "sofa"}, '
                     '{"bbox_2d": [200, 10, 310, 90], "label": "window"}]',
    tasks.OCR: '[{"bbox_2d": [0, 0, 160, 12], "text_content": "INVOICE 42"}, {"bbox_2d": [0, 20, 90, 32], '
               '"text_content": "tea 3.50"}, {"bbox_2d": [0, 40, 90, 52], "text_content": "cake 4.00"}]',
    tasks.CHART: '{"header": ["year", "sales"], "rows": [["2023", "5"], ["2024", "7"], ["2025", "9"]]}',
}


def cut_after_second_item(answer: str) -> str:
    """The answer as max_tokens (or a stop sequence) leaves it: its third item begun, not ended."""
    third = answer.index("{", answer.index("}", answer.index("}") + 1))
    return answer[: third + 12]


@pytest.mark.parametrize("family", sorted(tasks.BOX_UNITS))
@pytest.mark.parametrize("task", tasks.TASKS)
def test_an_answer_max_tokens_cut_has_no_result_and_says_so(task, family):
    """Whatever the task, a cut answer gives no result: a part would pass for the whole."""
    assert tasks.parse(task, family, WHOLE[task], ONE) is not None or task == tasks.VQA
    for text in (WHOLE[task], WHOLE[task][: len(WHOLE[task]) * 2 // 3]):
        with pytest.raises(tasks.CutAnswer, match=f"max_tokens cut the answer before its {task} result was "
                                                  r"complete \(finish reason LENGTH\)") as cut:
            tasks.parse(task, family, text, ONE, cut=True)
        assert f"{task}'s default, {tasks.DEFAULT_MAX_TOKENS[task]}" in str(cut.value)


@pytest.mark.parametrize("family", sorted(tasks.BOX_UNITS))
@pytest.mark.parametrize("task", [tasks.GROUNDING, tasks.OCR])
def test_json_broken_off_after_its_second_item_is_no_result_never_the_first_item(task, family):
    """An answer whose JSON does not close (cut by a stop sequence, or by max_tokens when the caller
    does not say) is an error naming that, not the first whole item found inside it."""
    text = cut_after_second_item(WHOLE[task])
    with pytest.raises(ParseError, match="its JSON is not whole"):
        tasks.parse(task, family, text, ONE)
    with pytest.raises(ParseError, match="its JSON is not whole"):
        tasks.parse(task, family, f"```json\n{text}", ONE)  # cut inside Qwen2.5-VL's code fence


def test_a_chart_broken_off_is_no_table():
    with pytest.raises(ParseError):
        tasks.parse(tasks.CHART, "qwen2_5_vl", WHOLE[tasks.CHART][:-14], ONE)


@pytest.mark.parametrize("family, outside", [
    ("qwen2_5_vl", [[330, 250, 400, 300], [10, 300, 50, 320], [20, 20, 20, 60]]),  # served 320x240
    ("pixtral", [[1001, 0, 1200, 500], [0, 1000, 500, 1100], [300, 300, 500, 300]]),
])
def test_boxes_outside_the_image_are_dropped_and_counted(family, outside):
    """Beyond the image's right or bottom edge, or with no area: no zero-area box comes back."""
    inside = [0, 0, 100, 100]
    items = [{"bbox_2d": box, "label": f"thing {i}"} for i, box in enumerate([inside, *outside])]
    result = tasks.parse(tasks.GROUNDING, family, json.dumps(items), ONE)
    assert [d.label for d in result.detections] == ["thing 0"] and result.boxes_outside == 3
    lines = [{"bbox_2d": box, "text_content": f"line {i}"} for i, box in enumerate([inside, *outside])]
    result = tasks.parse(tasks.OCR, family, json.dumps(lines), ONE)
    assert [line.text for line in result.lines] == ["line 0", "line 1", "line 2", "line 3"]
    assert result.lines[0].box is not None and all(line.box is None for line in result.lines[1:])
    assert result.boxes_outside == 3
